// Headless check of a `dvc plots show` page: run its inline scripts in order, as a browser would, in a
// context with no network, DOM or module loader (only what the page itself brings), with each plot's
// vegaEmbed(id, spec) call rendered to SVG by the page's own vega and vega-lite. Prints one line per plot:
// its element id, the SVG's length and its number of <path> marks. Usage: node render_plots.js index.html
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const context = vm.createContext({console, setTimeout, clearTimeout, Promise});
context.globalThis = context;
const plots = [];
for (const [, code] of html.matchAll(/<script[^>]*>([\s\S]*?)<\/script>/g)) {
  if (code.includes("var spec")) context.vegaEmbed = (id, spec) => plots.push([id, spec]);
  vm.runInContext(code, context);
}
(async () => {
  for (const [id, spec] of plots) {
    const view = new context.vega.View(context.vega.parse(context.vegaLite.compile(spec).spec), {renderer: "none"});
    const svg = await view.toSVG();
    console.log(id, svg.length, (svg.match(/<path/g) || []).length);
  }
})().catch(e => { console.error(e); process.exit(1); });
