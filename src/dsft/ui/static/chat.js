// dsft ui chat: streams OpenAI chat completions through the dashboard; reasoning (<think>) shown folded.
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const history = [];

  function syncTarget() {
    const url = $("target").value === "url";
    for (const el of document.querySelectorAll(".url-only")) el.style.display = url ? "" : "none";
  }
  $("target").addEventListener("change", syncTarget); syncTarget();

  function bubble(role) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.innerHTML = `<div class="who">${role}</div>`;
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning"; reasoning.hidden = true;
    reasoning.innerHTML = "<summary>reasoning</summary><div class=\"rtext\"></div>";
    const text = document.createElement("div"); text.className = "text";
    div.append(reasoning, text);
    $("chatlog").appendChild(div);
    return {div, reasoning, rtext: reasoning.querySelector(".rtext"), text};
  }

  // a model that does not split <think>…</think> itself: split it here
  function splitThink(raw) {
    const open = raw.indexOf("<think>");
    if (open < 0) return [null, raw];
    const close = raw.indexOf("</think>", open);
    if (close < 0) return [raw.slice(open + 7), raw.slice(0, open)];
    return [raw.slice(open + 7, close), raw.slice(0, open) + raw.slice(close + 8)];
  }

  async function send() {
    const prompt = $("prompt").value.trim();
    if (!prompt) return;
    $("prompt").value = ""; $("send").disabled = true; $("chat-msg").textContent = "";
    history.push({role: "user", content: prompt});
    bubble("user").text.textContent = prompt;
    const out = bubble("assistant");
    out.div.dataset.state = "streaming";
    const target = $("target").value;
    const body = {messages: history, max_tokens: $("max-tokens").value, temperature: $("temperature").value};
    if (target.startsWith("run:")) { body.run = target.slice(4); $("chat-msg").textContent = "starting the model server (first message only)…"; }
    else Object.assign(body, {base_url: $("base-url").value, api_key: $("api-key").value, model: $("model").value});
    let content = "", reasoning = "";
    try {
      const r = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      if (!r.ok) { const d = await r.json().catch(() => ({})); throw new Error(d.error || r.statusText); }
      $("chat-msg").textContent = "model " + (r.headers.get("X-Dsft-Model") || "");
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            const delta = ((chunk.choices || [])[0] || {}).delta || {};
            reasoning += delta.reasoning_content || delta.reasoning || "";
            content += delta.content || "";
          }
        }
        const [think, visible] = splitThink(content);
        const r2 = reasoning + (think || "");
        out.reasoning.hidden = !r2; out.rtext.textContent = r2; out.text.textContent = visible;
      }
      history.push({role: "assistant", content: splitThink(content)[1]});
      out.div.dataset.state = "done";
    } catch (err) {
      out.text.textContent = "error: " + err.message; out.div.dataset.state = "error";
      history.pop();
    } finally { $("send").disabled = false; }
  }
  $("send").addEventListener("click", send);
  $("prompt").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  $("clear").addEventListener("click", () => { history.length = 0; $("chatlog").innerHTML = ""; });
})();
