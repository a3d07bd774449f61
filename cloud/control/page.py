"""The fleet page served at `/`: one static HTML document that reads `/v1/fleet/health`
with an operator token the user pastes (kept in the tab's sessionStorage, never in a
cookie or the URL) and redraws every few seconds. No external scripts or fonts."""

from __future__ import annotations

from typing import Final

__all__ = ["FLEET_PAGE"]

FLEET_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgefleet fleet</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2733}
 h1{font-size:1.3rem} table{border-collapse:collapse;width:100%;margin:.8rem 0}
 th,td{padding:.3rem .5rem;border-bottom:1px solid #dde3ea;text-align:left}
 th{background:#f3f6f9} .off{color:#a33} .on{color:#1b7a3a} .bad{color:#a33;font-weight:600}
 #summary span{margin-right:1.5rem} input{width:28rem}
</style></head><body>
<h1>edgefleet fleet</h1>
<form id="auth"><label>Operator token <input id="token" type="password"
 autocomplete="off"></label> <button>Show</button></form>
<p id="error" class="bad"></p>
<div id="summary"></div>
<h2>Deployments</h2><table id="deployments"><thead><tr><th>id</th><th>model</th>
<th>target</th><th>state</th><th>wave</th><th>progress</th><th>reasons</th></tr></thead>
<tbody></tbody></table>
<h2>Devices</h2><table id="devices"><thead><tr><th>device</th><th>online</th>
<th>last seen</th><th>model</th><th>desired</th><th>state</th><th>buffer</th>
<th>labels</th></tr></thead><tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
const text = (v) => (v === null || v === undefined) ? "" : String(v);
function cell(row, value, cls) { const td = row.insertCell(); td.textContent = text(value);
  if (cls) td.className = cls; }
async function refresh() {
  const token = sessionStorage.getItem("edgefleet-token");
  if (!token) return;
  try {
    const r = await fetch("/v1/fleet/health", {headers: {Authorization: "Bearer " + token}});
    if (!r.ok) { $("error").textContent = "fleet health: HTTP " + r.status; return; }
    const h = await r.json(); $("error").textContent = "";
    $("summary").innerHTML = "";
    for (const [k, v] of [["devices", h.devices], ["online", h.online],
        ["buffered rows", h.buffer_depth_total], ["oldest buffered (s)",
        Math.round(h.buffer_age_s_max)]]) {
      const s = document.createElement("span"); s.textContent = k + ": " + v;
      $("summary").appendChild(s); }
    const deps = $("deployments").tBodies[0]; deps.innerHTML = "";
    for (const d of h.deployments) { const row = deps.insertRow(); const p = d.progress;
      cell(row, d.id); cell(row, d.model); cell(row, d.target);
      cell(row, d.state, d.state.startsWith("roll") && d.state !== "rolling" ? "bad" : "");
      cell(row, text(p.wave) + "/" + text(p.waves)); cell(row, text(p.percent) + " %");
      cell(row, (p.reasons || []).join("; ")); }
    const devs = $("devices").tBodies[0]; devs.innerHTML = "";
    for (const d of h.fleet) { const row = devs.insertRow();
      cell(row, d.device); cell(row, d.online ? "online" : "offline", d.online ? "on" : "off");
      cell(row, d.last_seen ? new Date(d.last_seen * 1000).toLocaleTimeString() : "never");
      cell(row, d.current_model); cell(row, d.desired_model);
      cell(row, d.state + (d.reason ? ": " + d.reason : ""),
           ["refused", "failed"].includes(d.state) ? "bad" : "");
      cell(row, d.buffer_depth); cell(row, Object.entries(d.labels || {}).map(
           ([k, v]) => k + "=" + v).join(" ")); }
  } catch (e) { $("error").textContent = "cannot reach the control plane: " + e; }
}
$("auth").addEventListener("submit", (e) => { e.preventDefault();
  sessionStorage.setItem("edgefleet-token", $("token").value); $("token").value = "";
  refresh(); });
refresh(); setInterval(refresh, 3000);
</script></body></html>
"""
