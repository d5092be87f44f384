// dsft ui run page: training curves from log.jsonl, then live over SSE (resumes after a reload); stop / resume.
"use strict";
(function () {
  const controls = document.getElementById("controls");
  const name = controls.dataset.run;
  const records = [];
  let pending = false, source = null;

  function draw() {
    pending = false;
    const c = dsftPlot.curvesFrom(records);
    dsftPlot.lineChart(document.getElementById("chart-loss"), [{name: "train loss", points: c.loss}]);
    dsftPlot.lineChart(document.getElementById("chart-lr"), [{name: "lr", points: c.lr}]);
    dsftPlot.lineChart(document.getElementById("chart-grad"), [{name: "grad norm", points: c.grad}]);
    dsftPlot.lineChart(document.getElementById("chart-eval"), Object.entries(c.eval).map(([k, p]) => ({name: k, points: p})),
      {empty: "no evaluation during training (train.evaluation_strategy)"});
    if (c.last) document.getElementById("last-step").textContent = `step ${c.last.step}, loss ${c.last.loss.toFixed(4)}`;
    document.getElementById("training").dataset.points = String(c.loss.length);
    document.getElementById("training").dataset.lastStep = c.last ? String(c.last.step) : "0";
  }
  function schedule() { if (!pending) { pending = true; requestAnimationFrame(draw); } }

  function setStatus(status, stages) {
    const badge = document.getElementById("status");
    badge.textContent = status; badge.className = "badge " + status;
    if (stages) document.getElementById("stages").textContent = stages.join(", ") || "none";
    document.getElementById("stop").disabled = status !== "running";
    document.getElementById("resume").disabled = !(status === "stopped" || status === "failed") || !controls.dataset.job;
  }

  function listen(from) {
    if (source) source.close();
    source = new EventSource(`/api/runs/${encodeURIComponent(name)}/events?start=${from}`);
    source.onmessage = ev => { records.push(JSON.parse(ev.data)); schedule(); };
    source.addEventListener("reset", () => { records.length = 0; schedule(); });
    source.addEventListener("status", ev => { const d = JSON.parse(ev.data); setStatus(d.status, d.stages); });
    source.addEventListener("end", () => { source.close(); source = null; });
  }

  async function post(path) {
    const msg = document.getElementById("control-msg");
    msg.textContent = "";
    const r = await fetch(`/api/runs/${encodeURIComponent(name)}/${path}`, {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"});
    const d = await r.json();
    if (!r.ok) { msg.textContent = d.error || r.statusText; return; }
    setStatus(d.job.state);
    msg.textContent = path === "stop" ? "stopping (Ctrl-C to the run; training keeps its newest checkpoint)…" : "resumed";
    if (path === "resume") listen(records.length);
    else if (!source) listen(records.length);
  }

  document.getElementById("stop").addEventListener("click", () => post("stop"));
  document.getElementById("resume").addEventListener("click", () => post("resume"));
  fetch(`/api/runs/${encodeURIComponent(name)}/log`).then(r => r.json()).then(d => {
    records.push(...d.records); draw(); listen(d.next);
  });
  window.addEventListener("resize", schedule);
})();
