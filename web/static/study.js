// A depth-width study: loss against depth per width with the fitted law's curves, and decode latency
// against depth per width with the latency budgets.
"use strict";

(async () => {
  const data = hybridnas.pageData();
  const points = (data.points || []).filter((p) => p.val_bpb !== null);
  const lossNode = document.getElementById("loss-depth");
  const latencyNode = document.getElementById("latency-depth");
  if (!points.length) {
    lossNode.textContent = latencyNode.textContent = "No measured points yet.";
    hybridnas.markReady();
    return;
  }
  const widths = [...new Set(points.map((p) => p.width))].sort((a, b) => a - b);
  const depths = points.map((p) => p.depth);
  const [dMin, dMax] = [Math.min(...depths), Math.max(...depths)];
  const law = data.law;
  const predict = (d, w) => law.l0 + law.a * d ** -law.alpha + law.b * w ** -law.beta;
  // Okabe-Ito (distinct under the common colour-vision deficiencies), as the operator colours.
  const colours = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];
  const loss = [];
  const latency = [];
  widths.forEach((w, i) => {
    const mine = points.filter((p) => p.width === w).sort((a, b) => a.depth - b.depth);
    const colour = colours[i % colours.length];
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
  hybridnas.markReady();
})();
