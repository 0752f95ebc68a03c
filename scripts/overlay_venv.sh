#!/usr/bin/env bash
# Make (once) a virtual environment that sees every package of the current Python's environment but
# holds other versions of a few: those it installs itself come first on its path. For testing
# against another Triton or transformers without reinstalling torch and the extension.
#
#   bash scripts/overlay_venv.sh DIR PACKAGE==VERSION...      prints DIR/bin/python
#
# Works whether the current Python (PYTHON, default python3) is a base interpreter or a venv:
# `venv --system-site-packages` would see the base interpreter's packages, not a venv's. Here a .pth
# file in DIR hands the current environment's site directories to site.addsitedir, which also runs
# their own .pth files (an editable install's finder among them).
set -euo pipefail
DIR=$1
shift
PY=${PYTHON:-python3}
stamp="$DIR/.overlay-of"
want="$("$PY" -c 'import sys; print(sys.prefix)') $*"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -rf "$DIR"
    "$PY" -m venv "$DIR"
    site_dir=$("$DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" - "$site_dir/_overlay_parent.pth" <<'EOF'
import site, sys
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
with open(sys.argv[1], "w") as f:
    f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
EOF
    "$DIR/bin/python" -m pip install --disable-pip-version-check -q "$@" >&2
    echo "$want" > "$stamp"
fi
echo "$DIR/bin/python"
