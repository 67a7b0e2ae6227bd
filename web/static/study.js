// A study's plots, by kind. depth-width: loss against depth per width with the fitted law's curves, and
// decode latency against depth with the budgets; fidelity: short against long val_bpb; ablation: each arm's
// paired differences; verdict: the searched front and the depth-width front on one latency axis.
"use strict";

// Okabe-Ito (distinct under the common colour-vision deficiencies), as the operator colours.
const COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];

function empty(nodes, text) {
  nodes.filter(Boolean).forEach((node) => (node.textContent = text));
}

async function depthWidth(data) {
  const points = (data.points || []).filter((p) => p.val_bpb !== null);
  const lossNode = document.getElementById("loss-depth");
  const latencyNode = document.getElementById("latency-depth");
  if (!points.length) return empty([lossNode, latencyNode], "No measured points yet.");
  const widths = [...new Set(points.map((p) => p.width))].sort((a, b) => a - b);
  const depths = points.map((p) => p.depth);
  const [dMin, dMax] = [Math.min(...depths), Math.max(...depths)];
  const law = data.law;
  const predict = (d, w) => law.l0 + law.a * d ** -law.alpha + law.b * w ** -law.beta;
  const loss = [];
  const latency = [];
  widths.forEach((w, i) => {
    const mine = points.filter((p) => p.width === w).sort((a, b) => a.depth - b.depth);
    const colour = COLOURS[i % COLOURS.length];
    const marker = { color: colour };
    loss.push({ type: "scatter", mode: "markers", name: `W ${w}`, x: mine.map((p) => p.depth), y: mine.map((p) => p.val_bpb), marker });
    if (law) {
      const xs = Array.from({ length: 50 }, (_, k) => dMin + ((dMax - dMin) * k) / 49);
      loss.push({ type: "scatter", mode: "lines", name: `law W ${w}`, showlegend: false, x: xs, y: xs.map((d) => predict(d, w)), line: { dash: "dot", color: colour } });
    }
    latency.push({ type: "scatter", mode: "lines+markers", name: `W ${w}`, x: mine.map((p) => p.depth), y: mine.map((p) => p.decode_ms), marker });
  });
  const budgets = (data.budgets || []).map((b) => ({ type: "line", xref: "paper", x0: 0, x1: 1, y0: b, y1: b, line: { dash: "dash", width: 1 } }));
  await Plotly.newPlot(lossNode, loss, hybridnas.baseLayout("depth (layers)", "val_bpb"), hybridnas.plotConfig);
  await Plotly.newPlot(latencyNode, latency, hybridnas.baseLayout("depth (layers)", "decode ms/token", { shapes: budgets }), hybridnas.plotConfig);
}

async function fidelity(data) {
  const node = document.getElementById("fidelity-scatter");
  const rows = (data.rows || []).filter((r) => r.short_val_bpb !== null && r.long_val_bpb !== null);
  if (!node) return;
  if (!rows.length) return empty([node], "No layout was trained both ways yet.");
  const trace = {
    type: "scatter", mode: "markers", name: "layouts", text: rows.map((r) => r.name),
    x: rows.map((r) => r.short_val_bpb), y: rows.map((r) => r.long_val_bpb), marker: { color: COLOURS[0] },
  };
  await Plotly.newPlot(node, [trace], hybridnas.baseLayout("short proxy val_bpb", "long training val_bpb"), hybridnas.plotConfig);
}

async function ablation(data) {
  const node = document.getElementById("ablation-pairs");
  const arms = Object.entries(data.arms || {});
  if (!node) return;
  if (!arms.some(([, pairs]) => pairs.length)) return empty([node], "No paired runs yet.");
  // Plotly's partial bundle draws scatters only: each arm's pairs as points, their mean beside them.
  const traces = arms.map(([arm, pairs], i) => ({
    type: "scatter", mode: "markers", name: arm.replace("_", " "),
    x: pairs.map(() => arm.replace("_", " ")), y: pairs.map((p) => p.difference),
    text: pairs.map((p) => `${p.layout}, seed ${p.seed}`), marker: { color: COLOURS[i % COLOURS.length], size: 9 },
  }));
  traces.push({
    type: "scatter", mode: "markers", name: "mean", x: arms.map(([arm]) => arm.replace("_", " ")),
    y: arms.map(([, pairs]) => pairs.reduce((sum, p) => sum + p.difference, 0) / Math.max(1, pairs.length)),
    marker: { color: "#000000", symbol: "line-ew-open", size: 24 },
  });
  const zero = [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 0, y1: 0, line: { dash: "dash", width: 1 } }];
  await Plotly.newPlot(node, traces, hybridnas.baseLayout("arm", "Δ val_bpb (arm − baseline)", { shapes: zero }), hybridnas.plotConfig);
}

async function verdict(data) {
  const node = document.getElementById("verdict-fronts");
  const fronts = data.fronts || {};
  if (!node) return;
  const sides = [["hybrid", "searched front"], ["llama", "depth–width Llamas"]];
  const traces = sides.map(([side, name], i) => {
    const front = fronts[side] || [];
    return {
      type: "scatter", mode: "lines+markers", line: { shape: "hv" }, name, text: front.map((p) => `${p.name} (${p.source})`),
      x: front.map((p) => p.decode_ms), y: front.map((p) => p.val_bpb), marker: { color: COLOURS[i] },
    };
  });
  if (!traces.some((t) => t.x.length)) return empty([node], "No fronts yet.");
  await Plotly.newPlot(node, traces, hybridnas.baseLayout("decode ms/token", "val_bpb"), hybridnas.plotConfig);
}

const PLOTS = { "depth-width": depthWidth, fidelity, ablation, verdict };

(async () => {
  const data = hybridnas.pageData();
  const plot = PLOTS[data.kind];
  if (plot) await plot(data);
  hybridnas.markReady();
})();
