// Speculative Cache: live stats on the node.
//
// The Python side sends a `speculative_cache.stats` event after every sampler step and once
// at the end of the run (see README, "Live stats"). This extension shows, under the node,
// a one-line summary ("14/50 computed · 3 rejected · 3.4x · ≈ 41 s saved · 210 MB"), a
// timeline strip with one cell per step, and a small chart of each verification's error
// against the threshold it had to meet. A setting hides them. Every frontend hook is
// optional: where a frontend lacks one, the extension does nothing rather than break the
// canvas.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// the main node, and the legacy 19-input node of graphs saved before the split
const NODE_TYPES = ["SpeculativeCacheSimple", "SpeculativeCache"];
const LEGACY_TYPE = "SpeculativeCache";
const SVG = "http://www.w3.org/2000/svg";
const EVENT = "speculative_cache.stats";
const SETTING = "SpeculativeCache.ShowStats";
const WIDGET = "speculative_cache_stats";
// Okabe-Ito colours (told apart with any colour vision), each with a second cue: a forecast cell is
// lower than a computed one, a rejected one is hatched; in the chart a check under its tolerance is
// a square, one over it a cross, and the tolerance a dashed line.
const COLORS = { C: "#0072B2", F: "#009E73", R: "#D55E00", ".": "#3a3a3a" };
const CELL_STYLE = {
  C: "height:100%;",
  F: "height:60%;",
  R: "height:100%;background-image:repeating-linear-gradient(45deg,rgba(0,0,0,.45) 0 2px,transparent 2px 4px);",
  ".": "height:100%;",
};
const TITLES = { C: "computed", F: "forecast (accepted)", R: "forecast rejected", ".": "not reached" };

function showStats() {
  try {
    const value = app.extensionManager?.setting?.get?.(SETTING);
    return value === undefined ? true : Boolean(value);
  } catch (e) {
    return true;
  }
}

function formatBytes(n) {
  if (!n) return "0 MB";
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GB`;
  return `${Math.max(n / 2 ** 20, 0.01).toFixed(n >= 100 * 2 ** 20 ? 0 : 1)} MB`;
}

function formatSeconds(x) {
  if (!Number.isFinite(x) || x <= 0) return "0 s";
  if (x >= 90) return `${(x / 60).toFixed(1)} min`;
  return `${x.toFixed(x >= 10 ? 0 : 1)} s`;
}

export function summaryText(s) {
  const steps = s.steps ?? 0;
  const done = (s.timeline ?? "").replace(/\./g, "").length;
  const head = s.final ? `${s.computed}/${steps} computed` : `step ${done}/${steps} · ${s.computed} computed`;
  const speed = Number.isFinite(s.speedup) ? `${Number(s.speedup).toFixed(1)}x` : "-";
  // a speed target: what was asked and what the run reached (a planned one placed its model calls
  // before the run, from 4x on)
  const how = s.target_schedule === "planned" ? " planned" : "";
  const pace = s.target_speedup
    ? `asked ${Number(s.target_speedup).toFixed(1)}x${how}, ${s.final ? "reached" : "so far"} ${speed}`
    : speed;
  const saved = `≈ ${formatSeconds(Number(s.saved_seconds))} saved`;
  // lookback checks each run of forecasts at the computed step that ends it; the probe verifies
  // each forecast with a real block and rejects those that fail
  let checks = s.acceptance === "lookback"
    ? `${s.looked_back ?? 0} checked`
    : `${s.verified ?? 0} verified, ${s.rejected ?? 0} rejected`;
  // computed steps whose update also corrected the path the forecasts took (Euler samplers)
  if (s.corrected) checks += `, ${s.corrected} corrected`;
  return `${head} · ${checks} · ${pace} · ${saved} · ${formatBytes(s.cache_bytes)}`;
}

// The chart's geometry: x = evaluation, y = log10 of the error (dots) and of the threshold
// (line), in a 100 x 30 box stretched to the panel.
export function chartPoints(s) {
  const errors = (s.errors ?? []).filter((e) => Number.isFinite(e[2]) && e[2] > 0 && e[3] > 0);
  if (!errors.length) return null;
  const n = Math.max(s.evaluations ?? 0, s.steps ?? 0, ...errors.map((e) => e[0] + 1), 1);
  const logs = errors.flatMap((e) => [Math.log10(e[2]), Math.log10(e[3])]);
  const lo = Math.min(...logs) - 0.15;
  const hi = Math.max(...logs) + 0.15;
  const y = (v) => 28 - (26 * (Math.log10(v) - lo)) / Math.max(hi - lo, 1e-6);
  const x = (i) => (100 * (i + 0.5)) / n;
  return {
    dots: errors.map((e) => ({ x: x(e[0]), y: y(e[2]), accepted: Boolean(e[4]), error: e[2], threshold: e[3], eval: e[0] })),
    line: errors.map((e) => `${x(e[0]).toFixed(2)},${y(e[3]).toFixed(2)}`).join(" "),
  };
}

function makePanel() {
  const root = document.createElement("div");
  root.className = "speculative-cache-stats";
  root.style.cssText =
    "display:flex;flex-direction:column;gap:4px;padding:2px 4px;font:12px sans-serif;" +
    "color:var(--input-text, #ddd);pointer-events:none;";
  const text = document.createElement("div");
  text.className = "speculative-cache-summary";
  text.style.cssText = "flex:none;";
  text.textContent = "Speculative Cache: waiting for a run";
  const strip = document.createElement("div");
  strip.className = "speculative-cache-timeline";
  strip.style.cssText = "display:flex;flex:none;height:12px;min-height:12px;gap:1px;";
  const chart = document.createElementNS(SVG, "svg");
  chart.setAttribute("class", "speculative-cache-chart");
  chart.setAttribute("viewBox", "0 0 100 30");
  chart.setAttribute("preserveAspectRatio", "none");
  chart.style.cssText = "flex:1;height:52px;min-height:52px;background:rgba(0,0,0,0.15);";
  const title = document.createElementNS(SVG, "title");
  chart.append(title);
  // the axes: error (log scale) up, the sampling steps along
  const yLabel = document.createElement("div");
  yLabel.className = "speculative-cache-axis-y";
  yLabel.textContent = "error (log)";
  yLabel.style.cssText = "writing-mode:vertical-rl;transform:rotate(180deg);font-size:10px;opacity:.8;text-align:center;";
  const plot = document.createElement("div");
  plot.style.cssText = "display:flex;flex:none;gap:2px;align-items:stretch;";
  plot.append(yLabel, chart);
  const legend = document.createElement("div");
  legend.className = "speculative-cache-legend";
  // (flex:none throughout: where a frontend gives the widget less room, nothing shrinks to nothing)
  legend.style.cssText = "display:flex;flex:none;justify-content:space-between;font-size:10px;opacity:.9;";
  legend.innerHTML =
    `<span class="speculative-cache-axis-x">steps →</span>` +
    `<span><span style="color:${COLORS.F}">■</span> under tolerance ` +
    `<span style="color:${COLORS.R}">✕</span> over ` +
    `<span style="color:#bbb">┄</span> tolerance</span>`;
  root.append(text, strip, plot, legend);
  return { root, text, strip, chart, title };
}

function renderChart(panel, stats) {
  const points = chartPoints(stats);
  panel.title.textContent = stats.acceptance === "lookback"
    ? "Error of the output forecast, measured at each computed step (square: under the tolerance, cross: " +
      "over) against the tolerance (dashed line), log scale"
    : "Verification error of each checked forecast (square: accepted, cross: rejected) against its " +
      "threshold (dashed line), log scale";
  panel.chart.replaceChildren(panel.title);
  if (!points) return;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("class", "speculative-cache-threshold");
  line.setAttribute("points", points.line);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#bbbbbb");
  line.setAttribute("stroke-width", "1");
  line.setAttribute("stroke-dasharray", "3 2");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  panel.chart.append(line);
  for (const p of points.dots) {
    let dot;
    if (p.accepted) {
      dot = document.createElementNS(SVG, "rect");
      dot.setAttribute("x", (p.x - 0.8).toFixed(2));
      dot.setAttribute("y", (p.y - 2).toFixed(2));
      dot.setAttribute("width", "1.6");
      dot.setAttribute("height", "4");
      dot.setAttribute("fill", COLORS.F);
    } else {
      // a cross: two strokes that keep their width however the chart is stretched
      dot = document.createElementNS(SVG, "path");
      const [x0, x1, y0, y1] = [p.x - 1, p.x + 1, p.y - 2.5, p.y + 2.5].map((v) => v.toFixed(2));
      dot.setAttribute("d", `M${x0},${y0}L${x1},${y1}M${x0},${y1}L${x1},${y0}`);
      dot.setAttribute("stroke", COLORS.R);
      dot.setAttribute("stroke-width", "1.6");
      dot.setAttribute("vector-effect", "non-scaling-stroke");
    }
    dot.setAttribute("class", `speculative-cache-error ${p.accepted ? "accepted" : "rejected"}`);
    const tip = document.createElementNS(SVG, "title");
    tip.textContent = `evaluation ${p.eval + 1}: error ${p.error.toPrecision(3)} vs threshold ${p.threshold.toPrecision(3)}`;
    dot.append(tip);
    panel.chart.append(dot);
  }
}

function render(panel, stats) {
  panel.root.style.display = showStats() ? "flex" : "none";
  panel.text.textContent = summaryText(stats);
  const timeline = stats.timeline ?? "";
  panel.strip.replaceChildren(
    ...Array.from(timeline).map((letter, i) => {
      const cell = document.createElement("div");
      cell.className = `speculative-cache-cell speculative-cache-${letter === "." ? "pending" : letter}`;
      cell.style.cssText = `flex:1;min-width:1px;align-self:flex-end;background-color:${COLORS[letter] ?? COLORS["."]};` +
        (CELL_STYLE[letter] ?? CELL_STYLE["."]);
      cell.title = `step ${i + 1}: ${TITLES[letter] ?? letter}`;
      return cell;
    })
  );
  renderChart(panel, stats);
}

function attachPanel(node) {
  if (node.speculativeCachePanel || typeof node.addDOMWidget !== "function") return;
  const panel = makePanel();
  const widget = node.addDOMWidget(WIDGET, "speculative_cache_stats", panel.root, {
    serialize: false,
    hideOnZoom: false,
    // the frontend keeps a 10 px margin above and below a DOM widget; room for a summary that
    // wraps to two lines on a narrow node
    getMinHeight: () => 150,
    getMaxHeight: () => 150,
  });
  if (widget) widget.serialize = false;
  node.speculativeCachePanel = panel;
  panel.root.style.display = showStats() ? "flex" : "none";
}

app.registerExtension({
  name: "SpeculativeCache.LiveStats",
  settings: [
    {
      id: SETTING,
      category: ["Speculative Cache", "Display", "Show stats"],
      name: "Show Speculative Cache stats on the node",
      tooltip: "Summary and per-step timeline under the Speculative Cache node.",
      type: "boolean",
      defaultValue: true,
      onChange: (value) => {
        for (const node of app.graph?._nodes ?? []) {
          if (node.speculativeCachePanel) {
            node.speculativeCachePanel.root.style.display = value === false ? "none" : "flex";
          }
        }
      },
    },
  ],
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.includes(nodeData?.name)) return;
    const legacy = nodeData.name === LEGACY_TYPE;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        attachPanel(this);
        if (legacy && this.speculativeCachePanel) {
          this.speculativeCachePanel.text.textContent =
            "Legacy node: runs as before. New graphs: Speculative Cache + Speculative Cache Options " +
            "(the console prints the equivalent settings).";
        }
      } catch (e) {
        console.debug?.("Speculative Cache: no stats panel", e);
      }
      return result;
    };
  },
  async setup() {
    // The server sends the stats only to the client that queued the prompt; the panel also shows
    // only prompts this tab saw start (ComfyUI's execution_start goes to the queuing client too),
    // so a run of someone else's never draws on a node of this tab's graph.
    const ownPrompts = [];
    api.addEventListener("execution_start", ({ detail }) => {
      if (!detail?.prompt_id) return;
      ownPrompts.push(detail.prompt_id);
      if (ownPrompts.length > 64) ownPrompts.shift();
    });
    api.addEventListener(EVENT, ({ detail }) => {
      try {
        if (!ownPrompts.includes(detail?.prompt_id)) return;
        const node = app.graph?.getNodeById?.(Number(detail?.node)) ?? app.graph?.getNodeById?.(detail?.node);
        if (!node) return;
        node.speculativeCacheStats = detail;
        if (node.speculativeCachePanel) render(node.speculativeCachePanel, detail);
        node.setDirtyCanvas?.(true, true);
      } catch (e) {
        console.debug?.("Speculative Cache: stats not shown", e);
      }
    });
  },
});
