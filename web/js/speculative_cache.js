// Speculative Cache frontend extension: shows what the cache did on the node itself.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "speculative_cache.stats";

app.registerExtension({
  name: "speculative_cache.stats",
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      try {
        const node = app.graph?.getNodeById?.(Number(detail?.node));
        if (!node) return;
        node.speculativeCacheStats = detail;
        node.setDirtyCanvas?.(true, true);
      } catch (e) {
        // never break the canvas
      }
    });
  },
});
