#!/bin/sh
# Build .dvc/plots-offline/template.html: DVC's plots page (`dvc plots show`) with vega, vega-lite and
# vega-embed inlined, so it renders without network. DVC's own page loads them from a CDN and stays blank
# offline. The versions are the ones DVC's renderer asks for (dvc_render/vega.py). Needs npm and python3.
set -eu
VEGA=5.20.2 VEGA_LITE=5.2.0 VEGA_EMBED=6.18.2
out="$(cd "$(dirname "$0")/.." && pwd)/.dvc/plots-offline"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "vega@$VEGA" "vega-lite@$VEGA_LITE" "vega-embed@$VEGA_EMBED" >/dev/null
for pkg in "vega-$VEGA" "vega-lite-$VEGA_LITE" "vega-embed-$VEGA_EMBED"; do
  mkdir "$pkg" && tar xzf "$pkg.tgz" -C "$pkg"
done
mkdir -p "$out"
python3 - "$out" "$VEGA" "$VEGA_LITE" "$VEGA_EMBED" <<'PY'
import hashlib, sys
from pathlib import Path

out, versions = Path(sys.argv[1]), dict(zip(("vega", "vega-lite", "vega-embed"), sys.argv[2:]))
scripts, notice = [], ["# Bundled chart libraries", "",
                       "`template.html` inlines these minified UMD builds (from the npm registry's tarballs) so that",
                       "`dvc plots show` renders offline. Rebuild with `scripts/build-plots-template.sh`.",
                       "The builds, as the vega project publishes them, also bundle some of their dependencies",
                       "(such as d3 modules, ISC): their licences are those of the dependencies' own npm packages.", ""]
for name, version in versions.items():
    build = Path(f"{name}-{version}/package/build/{name}.min.js")
    code = build.read_text(encoding="utf-8")
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        assert bad not in code, f"{build} contains {bad!r}: it cannot be inlined"
    scripts.append(f'    <script type="text/javascript">/* {name} {version} (BSD-3-Clause) */\n{code}\n    </script>')
    licence = Path(f"{name}-{version}/package/LICENSE").read_text(encoding="utf-8").strip()
    notice += [f"## {name} {version}", "", f"`package/build/{name}.min.js`, sha256 {hashlib.sha256(code.encode()).hexdigest()}",
               "", "```text", licence, "```", ""]
page = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
""" % "\n".join(scripts)
(out / "template.html").write_text(page, encoding="utf-8")
(out / "NOTICE.md").write_text("\n".join(notice), encoding="utf-8")
PY
echo "$out/template.html"
