// A tune job's curves: val_bpb against optimizer step, one line per trial; the trials ASHA stopped early
// are the shorter, dashed lines.
"use strict";

const COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];

async function curves(data) {
  const node = document.getElementById("tune-curves");
  const trials = (data.trials || []).filter((t) => t.curve.length);
  if (!node) return;
  if (!trials.length) {
    node.textContent = "No curves yet.";
    return;
  }
  // Plotly's partial bundle draws scatters only: each trial is a scatter in lines mode.
  const traces = trials.map((t, i) => ({
    type: "scatter",
    mode: "lines+markers",
    name: `${t.trial_id} (${t.status})`,
    x: t.curve.map((p) => p[0]),
    y: t.curve.map((p) => p[1]),
    line: { color: COLOURS[i % COLOURS.length], dash: t.status === "completed" ? "solid" : "dash" },
  }));
  await Plotly.newPlot(node, traces, hybridnas.baseLayout("optimizer step", "val_bpb"), hybridnas.plotConfig);
}

(async () => {
  await curves(hybridnas.pageData());
  hybridnas.markReady();
})();
