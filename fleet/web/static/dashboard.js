/* SparseFleet dashboard: fetches the JSON endpoints, draws the pages, follows /api/events.
 *
 * One file for the four views (body[data-page] = runs | run | fleet | device). Every value
 * from the server is escaped before it goes into HTML. When the first data is drawn the page
 * sets body[data-ready="1"] and window.SFDashboard.readyAt (performance.now(), ms), which the
 * browser test and bench/dashboard.py wait for.
 */
"use strict";
(function () {
  const state = { readyAt: null, renders: 0, events: 0 };
  window.SFDashboard = state;
  const $ = (sel) => document.querySelector(sel);

  function esc(value) {
    return String(value === null || value === undefined ? "" : value)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  const dash = "–";
  function bytes(n) {
    if (n === null || n === undefined) return dash;
    if (n < 1e3) return `${n} B`;
    if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
    if (n < 1e9) return `${(n / 1e6).toFixed(2)} MB`;
    return `${(n / 1e9).toFixed(2)} GB`;
  }
  const pct = (v) => (v === null || v === undefined ? dash : `${(v * 100).toFixed(1)}%`);
  const frac = (v) => (v === null || v === undefined ? dash : v.toFixed(3));
  function secs(s) {
    if (s === null || s === undefined) return dash;
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${(s / 3600).toFixed(1)} h`;
  }
  function ago(t) {
    if (t === null || t === undefined) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} d ago`;
  }
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : dash);

  function ready() {
    state.renders += 1;
    if (state.readyAt === null) {
      state.readyAt = performance.now();
      document.body.dataset.ready = "1";
    }
  }

  function notice(text) {
    const n = $("#notice");
    if (!n) return;
    n.hidden = !text;
    n.textContent = text || "";
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  /* Runs fn at most once at a time and at most once per minGapMs; calls made meanwhile
   * collapse into one more run. Fast rounds then cost a redraw per gap, not per round (the run
   * page: 1 s; its counters move at once from the event), and a change shows within the gap
   * plus one fetch. */
  function coalesce(fn, minGapMs) {
    const gap = minGapMs || 0;
    let running = false, pending = false, timer = null, last = -Infinity;
    async function run() {
      if (running) { pending = true; return; }
      const wait = last + gap - performance.now();
      if (wait > 0) {
        if (timer === null) timer = setTimeout(() => { timer = null; run(); }, wait);
        return;
      }
      running = true; pending = false; last = performance.now();
      try {
        await fn();
      } catch (err) {
        notice(`could not load: ${err.message}`);
      } finally { running = false; }
      if (pending) run();
    }
    run.now = () => { last = -Infinity; return run(); }; // what the operator asked for: no wait
    return run;
  }

  function live(query, handlers) {
    const indicator = $("#live");
    const source = new EventSource(`/api/events${query ? "?" + query : ""}`);
    source.onopen = () => { indicator.textContent = "live"; indicator.className = "live on"; };
    source.onerror = () => {
      indicator.textContent = "reconnecting"; indicator.className = "live retry";
    };
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        state.events += 1;
        handler(JSON.parse(event.data));
      });
    }
    window.addEventListener("pagehide", () => source.close());
    return source;
  }

  /* Replaces an element's content only when it differs (a live page redraws often). */
  function setHTML(el, html) { if (el.__sfHTML !== html) { el.__sfHTML = html; el.innerHTML = html; } }
  function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

  /* A table body from [key, html-of-one-<tr>] pairs, touching only the rows that changed or
   * moved: a live run adds one round at a time, and rebuilding every row each second would
   * cost the browser more than the new row. */
  function syncRows(tbody, rows) {
    if (tbody.rows.length === 0) {
      tbody.innerHTML = rows.map(([, html]) => html).join("");
      rows.forEach(([key, html], i) => { tbody.rows[i].dataset.key = key; tbody.rows[i].__sfHTML = html; });
      return;
    }
    const existing = new Map(Array.from(tbody.rows, (tr) => [tr.dataset.key, tr]));
    let previous = null;
    for (const [key, html] of rows) {
      let tr = existing.get(key);
      existing.delete(key);
      if (!tr || tr.__sfHTML !== html) {
        const template = document.createElement("template");
        template.innerHTML = html;
        const fresh = template.content.firstElementChild;
        fresh.dataset.key = key;
        fresh.__sfHTML = html;
        if (tr) tr.replaceWith(fresh);
        tr = fresh;
      }
      const wanted = previous ? previous.nextElementSibling : tbody.firstElementChild;
      if (wanted !== tr) tbody.insertBefore(tr, wanted);
      previous = tr;
    }
    for (const tr of existing.values()) tr.remove();
  }

  function badge(text, cls) { return `<span class="badge ${esc(cls || text)}">${esc(text)}</span>`; }
  function tags(map) {
    return Object.entries(map || {}).map(([k, v]) => `<span class="tag">${esc(v ? `${k}=${v}` : k)}</span>`).join("");
  }

  /* -- runs list ------------------------------------------------------------------------- */
  function runsPage() {
    const body = $("#runs-table tbody");
    const refresh = coalesce(async () => {
      const data = await getJSON("/api/runs");
      notice(data.has_store ? (data.runs.length ? "" : "no runs yet: start one with `fleet run start` or `fleet simulate`")
        : "no fleet state in this directory yet: runs appear here when one starts");
      setHTML(body, data.runs.map((r) => `<tr>
<td><a class="id" href="/runs/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td>
<td>${badge(r.status)}</td><td>${esc(r.strategy)}</td><td>${esc(r.model)}</td>
<td class="num">${r.rounds_closed}${r.rounds ? ` / ${r.rounds}` : ""}</td>
<td class="num">${pct(r.accuracy)}</td><td class="num">${pct(r.federated_accuracy)}</td>
<td class="num">${bytes(r.upload_bytes)}</td><td class="num">${bytes(r.download_bytes)}</td>
<td class="num">${frac(r.density)}</td><td>${esc(when(r.created_at))}</td></tr>`).join(""));
      ready();
    }, 1000);
    refresh();
    live("runs=1", { hello: refresh, runs: refresh });
    return refresh;
  }

  /* -- one run ---------------------------------------------------------------------------- */
  function runPage() {
    const runId = document.body.dataset.run;
    const base = `/api/runs/${encodeURIComponent(runId)}`;
    let closedSeen = -1;
    const drawLayers = coalesce(async () => {
      const data = await getJSON(`${base}/layers`);
      const series = Object.entries(data.layers).map(([name, pts]) => ({ name, points: pts }));
      SFCharts.line($("#chart-layers"), series, { xLabel: "round", yLabel: "density", integerX: true,
        yMin: 0, yMax: 1, emptyText: "dense model: no pruned layers" });
    }, 2000);
    const refresh = coalesce(async () => {
      const data = await getJSON(base);
      const run = data.run;
      $("#round-counter").textContent = String(run.current_round);
      $("#round-total").textContent = run.rounds === null ? dash : String(run.rounds);
      $("#rounds-closed").textContent = String(run.rounds_closed);
      const status = $("#run-status");
      status.textContent = run.status;
      status.className = `badge ${run.status}`;
      $("#run-meta").textContent = `${run.strategy} · ${run.model} · ${data.clients_per_round ?? dash} devices per round · created ${when(run.created_at)}`;
      const err = $("#run-error");
      err.hidden = !run.error;
      err.textContent = run.error || "";
      const open = data.open_round;
      $("#open-bar").style.width = open && open.selected ? `${(100 * open.answered) / open.selected}%` : "0";
      $("#open-round").textContent = open
        ? `round ${open.round} open: ${open.answered} of ${open.selected} answered; deadline ${when(open.deadline)}`
        : (run.status === "running" ? "between rounds" : `run ${run.status}`);
      $("#card-accuracy").textContent = pct(run.accuracy);
      $("#card-federated").textContent = pct(run.federated_accuracy);
      $("#card-up").textContent = bytes(run.upload_bytes);
      $("#card-down").textContent = bytes(run.download_bytes);
      $("#card-density").textContent = frac(run.density);
      const closed = data.rounds.filter((r) => r.status === "closed");
      const accRound = { name: "server", points: closed.filter((r) => r.accuracy !== null).map((r) => [r.round, r.accuracy * 100]) };
      const fedRound = { name: "federated", points: closed.filter((r) => r.federated_accuracy !== null).map((r) => [r.round, r.federated_accuracy * 100]) };
      const accMb = { name: "server", points: closed.filter((r) => r.accuracy !== null).map((r) => [r.cumulative_upload_mb, r.accuracy * 100]) };
      const fedMb = { name: "federated", points: closed.filter((r) => r.federated_accuracy !== null).map((r) => [r.cumulative_upload_mb, r.federated_accuracy * 100]) };
      const percent = (v) => `${plainNum(v)}%`;
      SFCharts.line($("#chart-accuracy-round"), fedRound.points.length ? [accRound, fedRound] : [accRound],
        { xLabel: "round", yLabel: "accuracy (%)", yFormat: percent, integerX: true });
      SFCharts.line($("#chart-accuracy-mb"), fedMb.points.length ? [accMb, fedMb] : [accMb],
        { xLabel: "cumulative uploaded MB", yLabel: "accuracy (%)", yFormat: percent });
      // Closed rounds only: an open round's bytes and answers are partial (the table shows it).
      const peak = Math.max(0, ...closed.map((r) => Math.max(r.bytes_up, r.bytes_down)));
      const [unit, scale] = peak >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
      SFCharts.line($("#chart-bytes"), [
        { name: `up (${unit})`, points: closed.map((r) => [r.round, r.bytes_up / scale]) },
        { name: `down (${unit})`, points: closed.map((r) => [r.round, r.bytes_down / scale]) },
      ], { xLabel: "round", yLabel: unit, yMin: 0, integerX: true });
      SFCharts.bars($("#chart-answers"), closed.map((r) => r.round), [
        { name: "answered", values: closed.map((r) => r.answered) },
        { name: "late", values: closed.map((r) => r.late) },
        { name: "rejected", values: closed.map((r) => r.rejected) },
      ], { xLabel: "round", yLabel: "updates" });
      const reasons = Object.entries(data.rejected_by_reason);
      $("#reasons").textContent = reasons.length ? reasons.map(([k, v]) => `${k}: ${v}`).join(" · ") : "none";
      syncRows($("#rounds-table tbody"), data.rounds.slice().reverse().slice(0, 500).map((r) => [String(r.round), `<tr>
<td class="num">${r.round}</td><td>${esc(r.status)}${r.skipped ? " (skipped)" : ""}</td>
<td class="num">${secs(r.duration_s)}</td><td class="num">${r.selected}</td>
<td class="num">${r.answered}</td><td class="num">${r.late}</td>
<td class="num" title="${esc(Object.entries(r.rejected_by_reason).map(([k, v]) => `${k}: ${v}`).join(", "))}">${r.rejected}</td>
<td class="num">${bytes(r.bytes_up)}</td><td class="num">${bytes(r.bytes_down)}</td>
<td class="num">${pct(r.accuracy)}</td><td class="num">${pct(r.federated_accuracy)}</td>
<td class="num">${frac(r.density)}</td><td>${esc(r.close_reason)}</td></tr>`]));
      if (run.rounds_closed !== closedSeen) { closedSeen = run.rounds_closed; drawLayers(); }
      ready();
    }, 1000);
    let resized = null;
    window.addEventListener("resize", () => {
      clearTimeout(resized);
      resized = setTimeout(() => { closedSeen = -1; refresh.now(); }, 250); // charts fit the width
    });
    refresh();
    live(`run=${encodeURIComponent(runId)}`, {
      hello: refresh,
      run: (marker) => {
        // The counters move at once, from the event; charts and tables follow with the fetch.
        setText($("#round-counter"), String(marker.current_round));
        setText($("#rounds-closed"), String(marker.rounds_closed));
        const status = $("#run-status");
        setText(status, marker.status);
        status.className = `badge ${marker.status}`;
        $("#open-bar").style.width = marker.open_round !== null && marker.selected
          ? `${(100 * marker.answered) / marker.selected}%` : "0";
        setText($("#open-round"), marker.open_round !== null
          ? `round ${marker.open_round} open: ${marker.answered} of ${marker.selected} answered`
          : (marker.status === "running" ? "between rounds" : `run ${marker.status}`));
        refresh();
      },
    });
    return refresh;
  }

  function plainNum(v) { return String(Math.round(v * 100) / 100); }

  /* -- the fleet -------------------------------------------------------------------------- */
  function fleetPage() {
    const form = $("#filters");
    const table = $("#fleet-table");
    const params = new URLSearchParams(location.search);
    const filters = { q: params.get("q") || "", state: params.get("state") || "all",
      tag: params.get("tag") || "", sort: params.get("sort") || "device_id",
      order: params.get("order") || "asc" };
    $("#f-q").value = filters.q; $("#f-state").value = filters.state; $("#f-tag").value = filters.tag;
    let rows = [];
    function query() {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(filters)) {
        if (v && !(k === "state" && v === "all") && !(k === "sort" && v === "device_id") && !(k === "order" && v === "asc")) q.set(k, v);
      }
      return q.toString();
    }
    function drawSort() {
      for (const th of table.querySelectorAll("th[data-sort]")) {
        th.classList.toggle("asc", th.dataset.sort === filters.sort && filters.order === "asc");
        th.classList.toggle("desc", th.dataset.sort === filters.sort && filters.order === "desc");
      }
    }
    function state(d) {
      const parts = [`<span class="dot${d.online ? " on" : ""}"></span>${d.online ? "online" : "offline"}`];
      if (d.cordoned) parts.push(badge("cordoned"));
      if (d.drained) parts.push(badge("drained"));
      return parts.join(" ");
    }
    function draw() {
      syncRows(table.tBodies[0], rows.map((d) => [d.device_id, `<tr data-device="${esc(d.device_id)}">
<td><a class="id" href="/devices/${encodeURIComponent(d.device_id)}">${esc(d.device_id)}</a></td>
<td>${state(d)}</td><td class="ago" data-t="${d.last_seen ?? ""}"></td>
<td>${tags(d.tags)}</td><td>${esc(d.agent_version || dash)}</td>
<td>${d.model_version === null ? dash : esc(`${d.model} v${d.model_version}`)}</td>
<td class="num">${frac(d.density)}</td><td class="num">${d.rounds_joined}</td>
<td class="num">${d.failures}</td><td class="num">${d.rejections}</td>
<td class="num">${bytes(d.bytes_up)}</td><td class="wrap">${esc(d.last_error)}</td></tr>`]));
    }
    const refresh = coalesce(async () => {
      const q = query();
      history.replaceState(null, "", q ? `/fleet?${q}` : "/fleet");
      const data = await getJSON(`/api/devices${q ? "?" + q : ""}`);
      const c = data.counts;
      $("#counts").textContent = `${c.total} devices: ${c.online} online, ${c.offline} offline, ${c.cordoned} cordoned, ${c.drained} drained; showing ${data.devices.length}`;
      notice(data.has_store ? "" : "no fleet state in this directory yet: devices appear here when they connect");
      rows = data.devices;
      draw();
      ages();
      drawSort();
      ready();
    }, 5000);
    let timer = null;
    form.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        filters.q = $("#f-q").value.trim(); filters.state = $("#f-state").value; filters.tag = $("#f-tag").value.trim();
        refresh.now();
      }, 200);
    });
    form.addEventListener("submit", (e) => e.preventDefault());
    table.tHead.addEventListener("click", (e) => {
      const th = e.target.closest("th[data-sort]");
      if (!th) return;
      filters.order = filters.sort === th.dataset.sort && filters.order === "asc" ? "desc" : "asc";
      filters.sort = th.dataset.sort;
      refresh.now();
    });
    /* "last seen" ages on the page's clock, not with every redraw (keeps rows unchanged). */
    function ages() {
      for (const cell of table.querySelectorAll("td.ago")) {
        setText(cell, ago(cell.dataset.t === "" ? null : Number(cell.dataset.t)));
      }
    }
    setInterval(ages, 5000);
    setInterval(refresh, 30000); // counters (rounds, bytes) move every round: no event for them
    refresh();
    live("fleet=1", { hello: refresh, fleet: refresh });
    return refresh;
  }

  /* -- one device ------------------------------------------------------------------------- */
  function devicePage() {
    const id = document.body.dataset.device;
    const base = `/api/devices/${encodeURIComponent(id)}`;
    const refresh = coalesce(async () => {
      const data = await getJSON(base);
      const d = data.device;
      const st = $("#device-state");
      st.textContent = d.online ? "online" : "offline";
      st.className = `badge ${d.online ? "online" : "offline"}`;
      const hw = d.hardware;
      const facts = [
        ["last seen", `${ago(d.last_seen)} (${when(d.last_seen)})`],
        ["flags", [d.cordoned ? "cordoned" : "", d.drained ? "drained" : ""].filter(Boolean).join(", ") || "schedulable when online"],
        ["tags", null, tags(d.tags) || dash],
        ["agent version", d.agent_version || dash],
        ["model", d.model_version === null ? dash : `${d.model} v${d.model_version} (run ${d.last_run})`],
        ["density", frac(d.density)],
        ["hardware", `${hw.machine || "?"}, ${hw.cpu_count || "?"} CPUs, ${bytes(hw.memory_bytes || null)} memory, torch ${hw.torch_version || "?"}`],
        ["local examples", String(d.dataset_size)],
        ["rounds joined", String(d.rounds_joined)],
        ["updates stored", String(d.updates_accepted)],
        ["failures", String(d.failures)],
        ["last error", d.last_error || dash],
        ["traffic", `${bytes(d.bytes_up)} up, ${bytes(d.bytes_down)} down`],
      ];
      setHTML($("#device-facts"), facts.map(([k, v, html]) => `<dt>${esc(k)}</dt><dd>${html !== undefined ? html : esc(v)}</dd>`).join(""));
      setHTML($("#history-table tbody"), data.history.map((h) => `<tr>
<td><a class="id" href="/runs/${encodeURIComponent(h.run_id)}">${esc(h.run_id)}</a></td>
<td class="num">${h.round}</td><td>${esc(when(h.opened_at))}</td>
<td class="outcome-${esc(h.outcome)}">${esc(h.outcome)}${h.rejection ? `: ${esc(h.rejection)}` : ""}</td>
<td class="num">v${h.model_version}</td><td class="num">${bytes(h.bytes_up)}</td>
<td class="num">${h.num_examples ?? dash}</td><td class="num">${secs(h.train_s)}</td></tr>`).join(""));
      const counts = Object.entries(d.rejections_by_reason);
      $("#rejection-counts").textContent = counts.length ? counts.map(([k, v]) => `${k}: ${v}`).join(" · ") : "none";
      setHTML($("#rejections-table tbody"), data.rejections.map((r) => `<tr>
<td>${esc(when(r.at))}</td><td>${esc(r.run_id ?? dash)}</td><td class="num">${r.round ?? dash}</td>
<td>${esc(r.reason)}</td><td class="wrap">${esc(r.detail)}</td></tr>`).join(""));
      ready();
    }, 5000);
    const actions = $("#actions");
    if (actions) {
      actions.addEventListener("click", async (e) => {
        const button = e.target.closest("button[data-action]");
        if (!button) return;
        const out = $("#action-result");
        try {
          const response = await fetch(`${base}/${button.dataset.action}`, { method: "POST" });
          const body = await response.json();
          out.textContent = response.ok ? `${button.dataset.action}: done` : body.error;
        } catch (err) { out.textContent = err.message; }
        refresh.now();
      });
    }
    refresh();
    live("runs=1&fleet=1", { hello: refresh, fleet: refresh, runs: refresh });
    return refresh;
  }

  const pages = { runs: runsPage, run: runPage, fleet: fleetPage, device: devicePage };
  const page = pages[document.body.dataset.page];
  if (page) state.refresh = page(); // the view's refresh, for the benchmark
})();
