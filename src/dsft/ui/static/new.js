// dsft ui new-run page: the form and the YAML editor, validated server-side by the CLI's schema.
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const form = $("run-form");

  function formValues() {
    const out = {};
    for (const el of form.elements) if (el.name && el.name !== "name") out[el.name] = el.value;
    return out;
  }
  function clearErrors() {
    for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
  }
  function showFieldErrors(errors) {
    const other = [];
    for (const [key, msg] of Object.entries(errors)) {
      const slot = form.querySelector(`.field-error[data-for="${CSS.escape(key)}"]`) ||
                   document.querySelector(`.field-error[data-yfor="${CSS.escape(key)}"]`);
      if (slot) {
        slot.textContent = msg;
        const input = form.elements.namedItem(key);
        if (input && input.classList) input.classList.add("invalid");
      } else other.push(`${key}: ${msg}`);
    }
    $("form-other-errors").textContent = other.join("\n");
  }
  async function postJSON(url, body) {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    let d = {};
    try { d = await r.json(); } catch (e) { d = {error: r.statusText}; }
    return [r, d];
  }

  $("launch").addEventListener("click", async () => {
    clearErrors(); $("form-msg").textContent = "validating…";
    const [r, d] = await postJSON("/api/runs", {name: $("f-name").value.trim(), form: formValues()});
    if (r.status === 201) { $("form-msg").textContent = "launched"; location.href = d.url; return; }
    $("form-msg").textContent = d.error || "fix the fields marked in red";
    showFieldErrors(d.errors || {});
  });

  $("to-yaml").addEventListener("click", async () => {
    clearErrors();
    const [, d] = await postJSON("/api/validate", {form: formValues()});
    if (d.errors && Object.keys(d.errors).length) { showFieldErrors(d.errors); return; }
    $("yaml").value = d.yaml; $("y-name").value = $("f-name").value; show("yaml");
  });

  function showYamlErrors(errors) {
    const ul = $("yaml-errors"); ul.innerHTML = "";
    $("yaml").classList.toggle("invalid", errors.length > 0);
    for (const e of errors) {
      const li = document.createElement("li");
      li.textContent = (e.line ? `line ${e.line}: ` : "") + `${e.key}: ${e.message}`;
      ul.appendChild(li);
    }
  }
  $("yaml-validate").addEventListener("click", async () => {
    const [, d] = await postJSON("/api/validate", {yaml: $("yaml").value});
    showYamlErrors(d.errors || []); $("yaml-msg").textContent = d.ok ? "valid" : "";
  });
  $("yaml-launch").addEventListener("click", async () => {
    document.querySelector('[data-yfor="name"]').textContent = "";
    const [r, d] = await postJSON("/api/runs", {name: $("y-name").value.trim(), yaml: $("yaml").value});
    if (r.status === 201) { location.href = d.url; return; }
    const errs = d.errors || {};
    showYamlErrors(errs.yaml || []);
    if (errs.name) document.querySelector('[data-yfor="name"]').textContent = errs.name;
    $("yaml-msg").textContent = d.error || "";
  });

  function show(which) {
    $("pane-form").hidden = which !== "form"; $("pane-yaml").hidden = which !== "yaml";
    $("tab-form").className = which === "form" ? "on" : "secondary"; $("tab-yaml").className = which === "yaml" ? "on" : "secondary";
  }
  $("tab-form").addEventListener("click", () => show("form"));
  $("tab-yaml").addEventListener("click", () => show("yaml"));
})();
