// The apportion dashboard: one snapshot a second from /api/v1/stream
// (server-sent events), drawn with the DOM and one canvas. Hand-written, no
// dependencies; every text from the cluster goes in through textContent.
"use strict";

// The stream spans the last minute at most, and at least MIN_WINDOW_S: a
// shorter history is drawn over the whole width.
const WINDOW_S = 60;
const MIN_WINDOW_S = 10;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function num(x) {
  // Decimal units, as amounts are usually declared (MEMORY=100e9 is 100G).
  for (const [size, unit] of [[1e12, "T"], [1e9, "G"], [1e6, "M"]]) {
    if (x >= size) return num(Math.round((x / size) * 10) / 10) + unit;
  }
  return Number.isInteger(x) ? String(x) : x.toFixed(2).replace(/\.?0+$/, "");
}

function colour(index, count) {
  return `hsl(${Math.round((index * 360) / Math.max(count, 1) + 200) % 360}, 62%, 52%)`;
}

function bar(kind, name, declared, held, queued) {
  const whole = declared > 0 ? declared : 1;
  const heldPart = Math.min(held / whole, 1);
  const queuedPart = Math.min(queued / whole, 1 - heldPart);
  const b = el("span", {
    class: "bar " + kind,
    "data-resource": name,
    "data-declared": declared,
    "data-held": held,
    "data-queued": queued,
    title: `${name}: ${num(held)} held, ${num(queued)} queued for, of ${num(declared)} declared`,
  });
  const h = el("span", { class: "held" });
  h.style.width = (heldPart * 100).toFixed(1) + "%";
  const q = el("span", { class: "queued" });
  q.style.left = (heldPart * 100).toFixed(1) + "%";
  q.style.width = (queuedPart * 100).toFixed(1) + "%";
  b.append(h, q);
  return b;
}

function memoryCell(m) {
  // The worker process's own memory (not the MEMORY resource); no bar without a limit.
  const cell = el("td", { class: "memory", "data-used": m.used, "data-limit": m.limit, "data-spilled": m.spilled });
  if (m.limit) cell.append(bar("memory", "memory", m.limit, m.used, 0), ` ${num(m.used)}B/${num(m.limit)}B`);
  else cell.append(`${num(m.used)}B`);
  if (m.spilled) cell.append(el("span", { class: "muted" }, ` · ${num(m.spilled)}B spilled`));
  return cell;
}

function drawWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(
    ...workers.map((w) => {
      const gone = w.state === "lost" || w.state === "retired";
      const resources = el("td");
      for (const [name, r] of Object.entries(w.resources)) {
        resources.append(
          el("span", { class: "res" }, name, bar("resource", name, r.declared, r.held, r.queued),
            `${num(r.held)}/${num(r.declared)}` + (r.queued ? ` (+${num(r.queued)})` : ""))
        );
      }
      return el(
        "tr",
        { class: "worker" + (gone ? " gone" : ""), "data-name": w.name, "data-state": w.state },
        el("td", {}, w.name),
        el("td", {}, w.address),
        el("td", { class: "state-" + w.state }, w.state + (w.queued ? ` · ${w.queued} queued` : "")),
        el("td", {}, bar("threads", "threads", w.threads, w.busy, 0), ` ${w.busy}/${w.threads}`),
        memoryCell(w.memory),
        resources,
        // A worker that left has no logs to ask for.
        el("td", {}, gone ? "" : el("a", { class: "logs", href: w.logs }, "logs"))
      );
    })
  );
}

function drawWaiting(waiting) {
  const body = document.querySelector("#waiting tbody");
  if (!waiting.length) {
    body.replaceChildren(el("tr", {}, el("td", { colSpan: 3, class: "muted" }, "nothing waits")));
    return;
  }
  body.replaceChildren(
    ...waiting.map((g) => {
      const needs = Object.entries(g.resources).map(([n, v]) => `${n}=${num(v)}`).join(" ") || "(no resources)";
      return el("tr", { class: "wait", "data-reason": g.reason },
        el("td", {}, needs), el("td", {}, g.count), el("td", { title: g.detail }, g.why));
    })
  );
}

function drawProgress(progress, prefixes) {
  const body = document.querySelector("#progress tbody");
  const rows = Object.entries(progress).sort(([a], [b]) => a.localeCompare(b));
  body.replaceChildren(
    ...rows.map(([prefix, p]) => {
      const total = p.done + p.erred + p.running + p.waiting || 1;
      const strip = el("span", { class: "progress" });
      for (const kind of ["done", "erred", "running", "waiting"]) {
        const part = el("span", { class: kind });
        part.style.width = ((100 * p[kind]) / total).toFixed(1) + "%";
        strip.append(part);
      }
      const swatch = el("i");
      swatch.style.background = colour(prefixes.indexOf(prefix), prefixes.length);
      return el("tr", { class: "prefix", "data-prefix": prefix },
        el("td", {}, swatch, " ", prefix), el("td", {}, p.done), el("td", {}, p.erred),
        el("td", {}, p.running), el("td", {}, p.waiting), el("td", {}, strip));
    })
  );
}

function drawStream(snapshot) {
  const canvas = document.getElementById("stream");
  const lanes = [];  // [worker id, lane] in worker order
  const rowOf = new Map();
  const names = new Map(snapshot.workers.map((w) => [w.id, w.name]));
  for (const w of snapshot.workers) {
    for (let lane = 0; lane < w.threads; lane++) {
      rowOf.set(`${w.id}/${lane}`, lanes.length);
      lanes.push([w.id, lane]);
    }
  }
  for (const [worker, lane] of snapshot.stream) {
    const at = `${worker}/${lane}`;
    if (!rowOf.has(at)) { rowOf.set(at, lanes.length); lanes.push([worker, lane]); }
  }
  const laneHeight = 12, left = 120;
  const cssWidth = canvas.clientWidth || 1200;
  canvas.width = cssWidth;
  canvas.height = Math.max(lanes.length * laneHeight + 18, 40);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const span = cssWidth - left - 6;
  const oldest = Math.max(0, ...snapshot.stream.map((run) => run[3]));
  const windowS = Math.min(WINDOW_S, Math.max(MIN_WINDOW_S, Math.ceil((oldest + 1) / 5) * 5));
  const x = (ago) => left + span * (1 - Math.min(ago, windowS) / windowS);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#555";
  let previous = null;
  lanes.forEach(([worker], i) => {
    if (worker !== previous) {
      ctx.fillText(names.get(worker) || `worker ${worker}`, 4, i * laneHeight + 10, left - 8);
      ctx.fillStyle = "#e3e6ea";
      ctx.fillRect(left, i * laneHeight, span, 1);
      ctx.fillStyle = "#555";
      previous = worker;
    }
  });
  let running = 0;
  for (const [worker, lane, prefix, started, stopped, status] of snapshot.stream) {
    const row = rowOf.get(`${worker}/${lane}`);
    if (stopped === null) running++;
    const x0 = x(started), x1 = Math.max(x(stopped === null ? 0 : stopped), x0 + 1);
    ctx.fillStyle = status === "erred" || status === "lost" ? "#b3261e"
      : colour(prefix, snapshot.prefixes.length);
    ctx.fillRect(x0, row * laneHeight + 2, x1 - x0, laneHeight - 3);
  }
  ctx.fillStyle = "#8a93a3";
  const bottom = lanes.length * laneHeight + 14;
  for (let i = 4; i >= 0; i--) {
    const ago = (windowS * i) / 4;
    ctx.textAlign = i === 0 ? "right" : "center";
    ctx.fillText(ago ? `-${num(Math.round(ago * 10) / 10)}s` : "now", x(ago), bottom);
  }
  ctx.textAlign = "left";
  canvas.dataset.runs = String(snapshot.stream.length);
  canvas.dataset.running = String(running);
  document.getElementById("legend").replaceChildren(
    ...snapshot.prefixes.map((prefix, i) => {
      const swatch = el("i");
      swatch.style.background = colour(i, snapshot.prefixes.length);
      return el("span", {}, swatch, prefix);
    })
  );
}

let updates = 0;

function draw(snapshot) {
  updates++;
  document.body.dataset.updates = String(updates);
  document.getElementById("rate").textContent = `${num(snapshot.tasks_per_second)} tasks/s`;
  document.getElementById("counts").textContent = Object.entries(snapshot.tasks)
    .map(([state, n]) => `${state} ${n}`).join(" · ");
  drawWorkers(snapshot.workers);
  drawWaiting(snapshot.waiting);
  drawProgress(snapshot.progress, snapshot.prefixes);
  drawStream(snapshot);
}

function connect() {
  const status = document.getElementById("connection");
  const source = new EventSource("/api/v1/stream");
  source.onopen = () => { status.textContent = "live"; };
  source.onmessage = (message) => draw(JSON.parse(message.data));
  source.onerror = () => { status.textContent = "reconnecting…"; };
}

connect();
