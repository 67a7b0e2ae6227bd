// Shared helpers of the dashboard's pages. No framework, no build step; served by the app itself.
"use strict";

const hybridnas = (() => {
  function pageData() {
    const node = document.getElementById("page-data");
    return node ? JSON.parse(node.textContent) : {};
  }

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // A 503 (the server is at its admission limit) is retried after its Retry-After, a few times.
  async function fetchJSON(url, tries = 4) {
    for (let attempt = 1; ; attempt++) {
      // No custom headers: the page's <link rel="preload"> fetches must match these requests.
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.ok) return response.json();
      if (response.status !== 503 || attempt >= tries) throw new Error(`${url}: ${response.status}`);
      const wait = Number(response.headers.get("Retry-After")) || 1;
      await new Promise((resolve) => setTimeout(resolve, wait * 1000 * attempt));
    }
  }

  // "Drawn": set two animation frames after the plots resolved, so the browser has painted them
  // (plotly_afterplot alone fires before the paint). The load benchmark and the browser tests wait on it.
  function markReady() {
    requestAnimationFrame(() =>
      requestAnimationFrame(() => {
        document.documentElement.dataset.ready = "1";
        window.hybridnasDrawnAt = performance.now();
      })
    );
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text; // text, never HTML: names and reasons are user data
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  function fmt(value, digits = 4) {
    if (value === null || value === undefined) return "-";
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    return Number(value).toPrecision(digits);
  }

  const plotConfig = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["toImage"] };

  function baseLayout(xTitle, yTitle, extra = {}) {
    return Object.assign(
      {
        margin: { l: 70, r: 20, t: 10, b: 55 },
        xaxis: { title: { text: xTitle } },
        yaxis: { title: { text: yTitle } },
        legend: { orientation: "h", y: -0.25 },
        hovermode: "closest",
        font: { size: 12 },
      },
      extra
    );
  }

  return { pageData, csrfToken, fetchJSON, markReady, cell, link, fmt, plotConfig, baseLayout };
})();
