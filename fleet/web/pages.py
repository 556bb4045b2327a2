"""The dashboard's HTML: page shells (the data comes from the JSON endpoints, drawn by
``static/dashboard.js``), the error pages and the login form.

Every value put into HTML goes through ``html.escape``; pages carry their parameters in
``data-`` attributes, never in inline scripts, so the Content-Security-Policy can forbid inline
code entirely. Scripts and styles are the package's own files under ``/static/`` (no CDN).
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from device import __version__

NAV = (("runs", "/runs", "Runs"), ("fleet", "/fleet", "Fleet"))


def _attrs(data: Mapping[str, str]) -> str:
    return "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in sorted(data.items()))


def layout(
    title: str,
    body: str,
    *,
    page: str,
    data: Mapping[str, str] | None = None,
    mode: str = "read-only",
    scripts: bool = True,
) -> str:
    """A full page. ``page`` selects the script's view and the highlighted tab; ``mode`` is the
    badge in the header ("read-only", or "signed in" when write actions are available)."""
    nav = "".join(
        f'<a href="{href}"{" class=current" if key == page else ""}>{label}</a>'
        for key, href, label in NAV
    )
    v = escape(__version__)
    script_tags = (
        f'<script src="/static/charts.js?v={v}" defer></script>'
        f'<script src="/static/dashboard.js?v={v}" defer></script>'
        if scripts
        else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · SparseFleet</title>
<link rel="stylesheet" href="/static/dashboard.css?v={v}">
<link rel="icon" href="/static/favicon.svg?v={v}" type="image/svg+xml">
{script_tags}
</head>
<body data-page="{escape(page)}"{_attrs(data or {})}>
<header class="top">
<a class="brand" href="/runs">SparseFleet</a>
<nav>{nav}</nav>
<span class="spacer"></span>
<span id="live" class="live" title="live updates">offline</span>
<span class="mode">{escape(mode)}</span>
</header>
<main>
{body}
</main>
<footer>sparsefleet {v}</footer>
</body>
</html>
"""


def runs_page(*, mode: str) -> str:
    body = """<h1>Runs</h1>
<p id="notice" class="notice" hidden></p>
<table id="runs-table" class="data">
<thead><tr><th>run</th><th>status</th><th>strategy</th><th>model</th><th>rounds</th>
<th>accuracy</th><th>federated</th><th>uploaded</th><th>downloaded</th><th>density</th>
<th>created</th></tr></thead>
<tbody></tbody>
</table>"""
    return layout("Runs", body, page="runs", mode=mode)


def run_page(run_id: str, *, mode: str) -> str:
    rid = escape(run_id)
    body = f"""<h1>Run <span class="id">{rid}</span>
<span id="run-status" class="badge"></span></h1>
<p id="run-meta" class="meta"></p>
<p id="run-error" class="notice error" hidden></p>
<section class="progress">
<div class="counter">round <strong id="round-counter">–</strong> of <span id="round-total">–</span>
· <span id="rounds-closed">0</span> closed</div>
<div class="bar"><div id="open-bar" class="fill"></div></div>
<div id="open-round" class="meta"></div>
</section>
<section class="cards">
<div class="card"><div class="label">accuracy</div>
<div id="card-accuracy" class="value">–</div></div>
<div class="card"><div class="label">federated accuracy</div>
<div id="card-federated" class="value">–</div></div>
<div class="card"><div class="label">uploaded</div><div id="card-up" class="value">–</div></div>
<div class="card"><div class="label">downloaded</div><div id="card-down" class="value">–</div></div>
<div class="card"><div class="label">density</div><div id="card-density" class="value">–</div></div>
</section>
<section class="charts">
<figure><figcaption>Accuracy by round</figcaption><svg id="chart-accuracy-round"></svg></figure>
<figure><figcaption>Accuracy by cumulative uploaded MB</figcaption>
<svg id="chart-accuracy-mb"></svg></figure>
<figure><figcaption>Bytes per round</figcaption><svg id="chart-bytes"></svg></figure>
<figure><figcaption>Answered, late and rejected per round</figcaption>
<svg id="chart-answers"></svg></figure>
<figure class="wide"><figcaption>Density per layer</figcaption><svg id="chart-layers"></svg>
</figure>
</section>
<h2>Rejected updates by reason</h2>
<p id="reasons" class="meta">none</p>
<h2>Rounds</h2>
<table id="rounds-table" class="data">
<thead><tr><th>round</th><th>status</th><th>duration</th><th>selected</th><th>answered</th>
<th>late</th><th>rejected</th><th>up</th><th>down</th><th>accuracy</th><th>federated</th>
<th>density</th><th>closed by</th></tr></thead>
<tbody></tbody>
</table>"""
    return layout(f"Run {run_id}", body, page="run", data={"run": run_id}, mode=mode)


def fleet_page(*, mode: str) -> str:
    body = """<h1>Fleet</h1>
<p id="counts" class="meta"></p>
<p id="notice" class="notice" hidden></p>
<form id="filters" class="filters">
<label>search <input id="f-q" name="q" type="search" placeholder="id, tag, version"></label>
<label>state <select id="f-state" name="state">
<option value="all">all</option><option value="online">online</option>
<option value="offline">offline</option><option value="schedulable">schedulable</option>
<option value="cordoned">cordoned</option><option value="drained">drained</option>
</select></label>
<label>tags <input id="f-tag" name="tag" placeholder="site=lab,arm64"></label>
</form>
<table id="fleet-table" class="data sortable">
<thead><tr>
<th data-sort="device_id">device</th><th data-sort="online">state</th>
<th data-sort="last_seen">last seen</th><th>tags</th>
<th data-sort="agent_version">agent</th><th data-sort="model_version">model</th>
<th data-sort="density">density</th><th data-sort="rounds_joined">rounds</th>
<th data-sort="failures">failures</th><th data-sort="rejections">rejected</th>
<th data-sort="bytes_up">uploaded</th><th>last error</th>
</tr></thead>
<tbody></tbody>
</table>"""
    return layout("Fleet", body, page="fleet", mode=mode)


def device_page(device_id: str, *, mode: str, can_write: bool) -> str:
    did = escape(device_id)
    actions = (
        """<div id="actions" class="actions">
<button data-action="cordon">cordon</button><button data-action="drain">drain</button>
<button data-action="uncordon">uncordon</button><span id="action-result"></span></div>"""
        if can_write
        else ""
    )
    body = f"""<h1>Device <span class="id">{did}</span>
<span id="device-state" class="badge"></span></h1>
{actions}
<dl id="device-facts" class="facts"></dl>
<h2>Rounds joined</h2>
<table id="history-table" class="data">
<thead><tr><th>run</th><th>round</th><th>opened</th><th>outcome</th><th>model</th>
<th>uploaded</th><th>examples</th><th>train</th></tr></thead>
<tbody></tbody>
</table>
<h2>Rejected messages</h2>
<p id="rejection-counts" class="meta"></p>
<table id="rejections-table" class="data">
<thead><tr><th>when</th><th>run</th><th>round</th><th>reason</th><th>detail</th></tr></thead>
<tbody></tbody>
</table>"""
    return layout(
        f"Device {device_id}",
        body,
        page="device",
        data={"device": device_id, "write": "1" if can_write else "0"},
        mode=mode,
    )


def error_page(status: int, title: str, message: str) -> str:
    """A plain page for 400/401/404/500: what went wrong, in one sentence, and where to go."""
    body = f"""<h1>{status} · {escape(title)}</h1>
<p class="notice error">{escape(message)}</p>
<p><a href="/runs">Runs</a> · <a href="/fleet">Fleet</a></p>"""
    return layout(title, body, page="error", scripts=False)


def login_page(next_path: str, *, failed: bool = False) -> str:
    """The form that exchanges the token for a session cookie."""
    notice = '<p class="notice error">That token is not right.</p>' if failed else ""
    body = f"""<h1>Sign in</h1>
{notice}
<p>This dashboard needs its token (the <code>--token</code> it was started with).</p>
<form method="post" action="/login" class="login">
<input type="hidden" name="next" value="{escape(next_path)}">
<label>token <input name="token" type="password" autocomplete="current-password" autofocus>
</label>
<button type="submit">sign in</button>
</form>"""
    return layout("Sign in", body, page="login", scripts=False, mode="signed out")
