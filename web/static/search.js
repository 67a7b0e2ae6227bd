// The search page: the Pareto scatter, the hypervolume curves, the candidate table and the feature panel,
// kept live from the API's event stream. One refresh in flight at a time; the user's zoom survives updates
// (a constant uirevision per objective pair).
"use strict";

(() => {
  const data = hybridnas.pageData();
  const id = data.search_id;
  const api = `/api/searches/${id}`;
  const state = { sort: "id", status: "", offset: 0, limit: 25, selected: new Set() };
  const refresh = { running: false, again: false, last: 0 };
  let drawn = false;

  const axisX = document.getElementById("axis-x");
  const axisY = document.getElementById("axis-y");
  const title = (name) => data.titles[name] || name;
  // Plotly reads a few HTML-like tags in hover text and labels: user strings go in without any.
  const plain = (text) => String(text).replace(/[<>&]/g, "");

  function scatterTraces(s) {
    const idx = s.ids.map((_, i) => i);
    const rest = idx.filter((i) => !s.on_front[i]);
    const front = idx.filter((i) => s.on_front[i]).sort((a, b) => s.x[a] - s.x[b] || s.y[a] - s.y[b]);
    const presets = idx.filter((i) => s.presets[String(s.ids[i])]);
    const [xn, yn] = s.objectives;
    const hover = (i) => {
      const cid = s.ids[i];
      const layout = s.layouts[String(cid)] || "";
      const preset = s.presets[String(cid)] ? ` (${plain(s.presets[String(cid)])})` : "";
      return `candidate ${cid}${preset}, generation ${s.generations[i]}<br>${xn} ${hybridnas.fmt(s.x[i])}` +
        `<br>${yn} ${hybridnas.fmt(s.y[i])}${layout ? "<br>" + plain(layout) : ""}`;
    };
    const pick = (list, key) => list.map((i) => s[key][i]);
    const errors = (key, list) => ({
      type: "data", symmetric: true, visible: list.some((i) => s[key][i] !== null),
      array: list.map((i) => (s[key][i] === null ? 0 : s[key][i] / 2)), thickness: 1, width: 3,
    });
    return [
      {
        name: "evaluated", type: "scatter", mode: "markers", x: pick(rest, "x"), y: pick(rest, "y"),
        customdata: pick(rest, "ids"), hovertext: rest.map(hover), hoverinfo: "text",
        marker: {
          size: 6, opacity: 0.75, color: pick(rest, "generations"), colorscale: "Viridis",
          cmin: 0, cmax: Math.max(1, ...s.generations), showscale: true,
          colorbar: { title: { text: "generation" }, thickness: 10 },
        },
      },
      {
        name: "Pareto front", type: "scatter", mode: "lines+markers", x: pick(front, "x"), y: pick(front, "y"),
        customdata: pick(front, "ids"), hovertext: front.map(hover), hoverinfo: "text",
        line: { shape: "hv", color: "#D55E00", width: 2 },
        marker: { size: 9, color: "#D55E00", line: { color: "#000", width: 1 } },
        error_x: errors("x_iqr", front), error_y: errors("y_iqr", front),
      },
      {
        name: "preset baselines", type: "scatter", mode: "markers+text", x: pick(presets, "x"),
        y: pick(presets, "y"), customdata: pick(presets, "ids"), hovertext: presets.map(hover),
        hoverinfo: "text", text: presets.map((i) => plain(s.presets[String(s.ids[i])])), textposition: "top center",
        marker: { size: 13, symbol: "diamond-open", color: "#000", line: { width: 2 } },
      },
    ];
  }

  async function drawScatter() {
    const x = axisX.value, y = axisY.value;
    const node = document.getElementById("scatter");
    const note = document.getElementById("scatter-note");
    if (x === y) {
      note.textContent = "Choose two different objectives.";
      return;
    }
    const shown = document.getElementById("max-points").value;
    const s = await hybridnas.fetchJSON(`${api}/scatter?x=${x}&y=${y}&max_points=${shown}`);
    performance.mark("hybridnas:scatter-data");
    const layout = hybridnas.baseLayout(title(x), title(y), { uirevision: `${x}|${y}`, height: 460 });
    await Plotly.react(node, scatterTraces(s), layout, hybridnas.plotConfig);
    performance.mark("hybridnas:scatter-drawn");
    note.textContent = s.total === 0 ? "No finished candidates yet." :
      s.shown < s.total ? `${s.shown.toLocaleString("en-US")} of ${s.total.toLocaleString("en-US")} shown; every front point shown (${s.front}).` :
      `${s.total.toLocaleString("en-US")} candidates, ${s.front} on the front.`;
    if (!node.dataset.clicks) {
      node.dataset.clicks = "1";
      node.on("plotly_click", (event) => {
        const point = event.points && event.points[0];
        if (point && point.customdata) window.location.href = `/candidates/${point.customdata}`;
      });
    }
  }

  async function drawHypervolume() {
    const h = await hybridnas.fetchJSON(`${api}/hypervolume`);
    const line = { type: "scatter", mode: "lines+markers", line: { shape: "hv", color: "#0072B2" }, marker: { size: 4 } };
    const small = (xTitle) => hybridnas.baseLayout(xTitle, "hypervolume (normalized objectives)", { uirevision: "hv", height: 280 });
    await Promise.all([
      Plotly.react("hv-evaluations", [{ ...line, x: h.n_evaluations, y: h.hypervolume, name: "hypervolume" }], small("evaluations"), hybridnas.plotConfig),
      Plotly.react("hv-time", [{ ...line, x: h.recorded_at, y: h.hypervolume, name: "hypervolume" }], small("wall time (UTC)"), hybridnas.plotConfig),
    ]);
  }

  // Multi-fidelity searches: each rung's counts, promotions and hypervolume, and each rung's front.
  async function drawRungs() {
    if (!data.fidelity) return;
    const r = await hybridnas.fetchJSON(`${api}/rungs`);
    const body = document.querySelector("#rungs tbody");
    body.replaceChildren(...r.rungs.map((rung) => {
      const row = document.createElement("tr");
      const done = (rung.counts.completed || 0) + (rung.counts.reused || 0);
      for (const value of [rung.rung, rung.steps, done, rung.counts.running || 0, rung.counts.failed || 0,
        rung.promoted, rung.front.length, hybridnas.fmt(rung.hypervolume), rung.steps_trained]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      return row;
    }));
    const [quality, cost] = r.objectives;
    const traces = r.rungs.filter((rung) => rung.front.length).map((rung) => ({
      type: "scatter", mode: "lines+markers", line: { shape: "hv" },
      x: rung.front.map((p) => p[cost]), y: rung.front.map((p) => p[quality]),
      text: rung.front.map((p) => `candidate ${p.candidate_id}`), name: `rung ${rung.rung} (${rung.steps} steps)`,
    }));
    await Plotly.react("rung-fronts", traces, hybridnas.baseLayout(title(cost), title(quality), { uirevision: "rungs", height: 300 }), hybridnas.plotConfig);
  }

  async function drawTable() {
    const params = new URLSearchParams({ limit: state.limit, offset: state.offset, sort: state.sort });
    if (state.status) params.set("status", state.status);
    const page = await hybridnas.fetchJSON(`${api}/candidates?${params}`);
    const body = document.querySelector("#candidates tbody");
    const rows = page.items.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.id = c.id;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = state.selected.has(c.id);
      box.setAttribute("aria-label", `select candidate ${c.id}`);
      box.addEventListener("change", () => { box.checked ? state.selected.add(c.id) : state.selected.delete(c.id); compareLink(); });
      hybridnas.cell(tr, "").appendChild(box);
      hybridnas.cell(tr, "").appendChild(hybridnas.link(`/candidates/${c.id}`, String(c.id)));
      hybridnas.cell(tr, String(c.generation));
      const badge = document.createElement("span");
      badge.className = `status status-${c.status}`;
      badge.textContent = c.status;
      hybridnas.cell(tr, "").appendChild(badge);
      hybridnas.cell(tr, hybridnas.fmt(c.val_bpb));
      hybridnas.cell(tr, hybridnas.fmt(c.decode_ms));
      hybridnas.cell(tr, hybridnas.fmt(c.n_params));
      hybridnas.cell(tr, c.on_front ? "yes" : "");
      hybridnas.cell(tr, c.failure_reason || "", "reason");
      return tr;
    });
    body.replaceChildren(...rows);
    if (!rows.length) {
      const tr = document.createElement("tr");
      hybridnas.cell(tr, state.status ? `No ${state.status} candidates.` : "No candidates yet.", "empty").colSpan = 9;
      body.appendChild(tr);
    }
    const last = Math.min(page.offset + page.items.length, page.total);
    document.getElementById("page-info").textContent = `${page.total ? page.offset + 1 : 0}-${last} of ${page.total}`;
    document.getElementById("page-prev").disabled = page.offset === 0;
    document.getElementById("page-next").disabled = last >= page.total;
    document.querySelectorAll("button.sort").forEach((b) => {
      const name = b.dataset.sort;
      b.setAttribute("aria-sort", state.sort === name ? "ascending" : state.sort === `-${name}` ? "descending" : "none");
    });
  }

  function compareLink() {
    const link = document.getElementById("compare-link");
    const ids = [...state.selected];
    link.hidden = ids.length < 2 || ids.length > 4;
    link.href = `/compare?ids=${ids.join(",")}`;
  }

  async function drawFeatures() {
    const f = await hybridnas.fetchJSON(`${api}/features`);
    const body = document.querySelector("#features tbody");
    const rows = f.features.slice(0, 8).map((e) => {
      const tr = document.createElement("tr");
      hybridnas.cell(tr, e.feature);
      data.objectives.forEach((o) => hybridnas.cell(tr, e.spearman[o] === null || e.spearman[o] === undefined ? "-" : e.spearman[o].toFixed(2)));
      return tr;
    });
    body.replaceChildren(...rows);
    document.getElementById("features-note").textContent = f.n_candidates < 3
      ? "Too few completed candidates for correlations yet."
      : `Spearman rank correlation over ${f.n_candidates} completed candidates (a correlation, not a cause).`;
  }

  async function drawCounts() {
    const d = await hybridnas.fetchJSON(api);
    document.getElementById("search-status").textContent = d.status;
    document.getElementById("progress").textContent = d.budget ? `${d.n_evaluations} / ${d.budget}` : `${d.n_evaluations}`;
    document.getElementById("count-completed").textContent = (d.counts.completed || 0) + (d.counts.reused || 0);
    document.getElementById("count-running").textContent = d.counts.running || 0;
    document.getElementById("count-failed").textContent = d.counts.failed || 0;
    document.getElementById("hypervolume").textContent = hybridnas.fmt(d.hypervolume);
  }

  // One refresh at a time: an event that comes while one runs asks for one more afterwards, never a pile.
  // At most two requests at once: the server admits a few per process and refuses the rest (503).
  async function update() {
    if (refresh.running) { refresh.again = true; return; }
    refresh.running = true;
    try {
      await Promise.all([drawScatter(), drawTable()]);
      await Promise.all([drawHypervolume(), drawCounts()]);
      await drawRungs();
      await drawFeatures();
    } catch (err) {
      console.warn("refresh failed, the next event retries:", err.message);
    } finally {
      refresh.running = false;
      refresh.last = Date.now();
      if (refresh.again) { refresh.again = false; setTimeout(update, 1000); }
    }
  }

  function live() {
    if (data.terminal.includes(data.status) || !window.EventSource) return;
    // From the page's cursor: only what finishes from now on (EventSource resumes with Last-Event-ID).
    const source = new EventSource(data.cursor ? `${api}/events?since=${encodeURIComponent(data.cursor)}` : `${api}/events`);
    source.addEventListener("evaluation", update);
    source.addEventListener("status", update);
    source.addEventListener("end", () => { source.close(); update(); });
  }

  document.getElementById("max-points").addEventListener("change", () => drawScatter());
  axisX.addEventListener("change", () => drawScatter());
  axisY.addEventListener("change", () => drawScatter());
  document.getElementById("filter-status").addEventListener("change", (e) => { state.status = e.target.value; state.offset = 0; drawTable(); });
  document.getElementById("page-prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); drawTable(); });
  document.getElementById("page-next").addEventListener("click", () => { state.offset += state.limit; drawTable(); });
  document.querySelectorAll("button.sort").forEach((b) => b.addEventListener("click", () => {
    const name = b.dataset.sort;
    state.sort = state.sort === name ? `-${name}` : name;
    state.offset = 0;
    drawTable();
  }));

  (async () => {
    refresh.running = true;
    try {
      await Promise.all([drawScatter(), drawTable()]);
      drawn = true;
      hybridnas.markReady();
      await drawHypervolume();
      await drawRungs();
      await drawFeatures();
    } finally {
      refresh.running = false;
      if (refresh.again) { refresh.again = false; update(); }
    }
    live();
  })();
  window.hybridnasSearch = { update, isDrawn: () => drawn };
})();
