// Loss curves of one candidate (its page) or several (the compare page).
"use strict";

(async () => {
  const data = hybridnas.pageData();
  const node = document.getElementById("loss");
  const curves = (data.curves || []).filter((c) => c.points.length);
  if (!node) return;
  if (!curves.length) {
    node.textContent = "No training curve recorded.";
    hybridnas.markReady();
    return;
  }
  const traces = curves.map((c) => ({
    type: "scatter",
    mode: "lines",
    name: `candidate ${c.id}`,
    x: c.points.map((p) => p[0]),
    y: c.points.map((p) => p[1]),
  }));
  const layout = hybridnas.baseLayout("training step", "training loss (nats per token)", {
    showlegend: curves.length > 1,
  });
  await Plotly.newPlot(node, traces, layout, hybridnas.plotConfig);
  hybridnas.markReady();
})();
