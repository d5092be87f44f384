// dsft ui compare page: every run's curves overlaid.
"use strict";
(async function () {
  const names = document.getElementById("curves").dataset.runs.split(",");
  const curves = await Promise.all(names.map(n =>
    fetch(`/api/runs/${encodeURIComponent(n)}/log`).then(r => r.json()).then(d => dsftPlot.curvesFrom(d.records))));
  const series = key => names.map((n, i) => ({name: n, points: curves[i][key]}));
  dsftPlot.lineChart(document.getElementById("cmp-loss"), series("loss"));
  dsftPlot.lineChart(document.getElementById("cmp-lr"), series("lr"));
  dsftPlot.lineChart(document.getElementById("cmp-grad"), series("grad"));
  dsftPlot.lineChart(document.getElementById("cmp-eval"), names.map((n, i) => ({name: n, points: curves[i].eval.eval_loss || []})),
    {empty: "no evaluation during training"});
})();
