// Speculative Cache: live stats on the node.
//
// The Python side sends a `speculative_cache.stats` event after every sampler step and once
// at the end of the run (see README, "Live stats"). This extension shows, under the node,
// a one-line summary ("14/50 computed · 3 rejected · 3.4x · 210 MB") and a timeline strip
// with one cell per step. A setting hides both. Every frontend hook is optional: where a
// frontend lacks one, the extension does nothing rather than break the canvas.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "SpeculativeCache";
const EVENT = "speculative_cache.stats";
const SETTING = "SpeculativeCache.ShowStats";
const WIDGET = "speculative_cache_stats";
const COLORS = { C: "#5b7db8", F: "#3fa34d", R: "#d9822b", ".": "#3a3a3a" };
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

export function summaryText(s) {
  const steps = s.steps ?? 0;
  const done = (s.timeline ?? "").replace(/\./g, "").length;
  const head = s.final ? `${s.computed}/${steps} computed` : `step ${done}/${steps} · ${s.computed} computed`;
  const speed = Number.isFinite(s.speedup) ? `${Number(s.speedup).toFixed(1)}x` : "-";
  return `${head} · ${s.rejected} rejected · ${speed} · ${formatBytes(s.cache_bytes)}`;
}

function makePanel() {
  const root = document.createElement("div");
  root.className = "speculative-cache-stats";
  root.style.cssText =
    "display:flex;flex-direction:column;gap:4px;padding:2px 4px;font:12px sans-serif;" +
    "color:var(--input-text, #ddd);pointer-events:none;";
  const text = document.createElement("div");
  text.className = "speculative-cache-summary";
  text.textContent = "Speculative Cache: waiting for a run";
  const strip = document.createElement("div");
  strip.className = "speculative-cache-timeline";
  strip.style.cssText = "display:flex;height:12px;min-height:12px;gap:1px;";
  root.append(text, strip);
  return { root, text, strip };
}

function render(panel, stats) {
  panel.root.style.display = showStats() ? "flex" : "none";
  panel.text.textContent = summaryText(stats);
  const timeline = stats.timeline ?? "";
  panel.strip.replaceChildren(
    ...Array.from(timeline).map((letter, i) => {
      const cell = document.createElement("div");
      cell.className = `speculative-cache-cell speculative-cache-${letter === "." ? "pending" : letter}`;
      cell.style.cssText = `flex:1;min-width:1px;background:${COLORS[letter] ?? COLORS["."]};`;
      cell.title = `step ${i + 1}: ${TITLES[letter] ?? letter}`;
      return cell;
    })
  );
}

function attachPanel(node) {
  if (node.speculativeCachePanel || typeof node.addDOMWidget !== "function") return;
  const panel = makePanel();
  const widget = node.addDOMWidget(WIDGET, "speculative_cache_stats", panel.root, {
    serialize: false,
    hideOnZoom: false,
    // the frontend keeps a 10 px margin above and below a DOM widget
    getMinHeight: () => 56,
    getMaxHeight: () => 56,
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
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        attachPanel(this);
      } catch (e) {
        console.debug?.("Speculative Cache: no stats panel", e);
      }
      return result;
    };
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      try {
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
