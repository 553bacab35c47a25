#!/usr/bin/env bash
# Replayable part of issue 14's restructure: move modules to their layer and
# rewrite every import of them (daemon/, tests/, bench/, docs/). Idempotent:
# a move already made is skipped, a rewritten import no longer matches.
#   tools/restructure_moves.sh            # moves + rewrites
#   tools/restructure_moves.sh --rewrite  # rewrites only (after merging main)
set -euo pipefail
cd "$(dirname "$0")/.."

# old dotted name (under daemon.)  new dotted name (under daemon.)
MOVES="
alerts domain.alerts
campaigns domain.campaigns
contacts domain.contacts
events domain.events
monitoring domain.monitoring
pacing domain.pacing
unconfirmed domain.unconfirmed
tasks app.tasks
jobs app.jobs
queue store.queue
queue_bulk store.queue_bulk
leader roles.leader
scheduler roles.scheduler
worker roles.worker
web roles.web
child supervision.child
supervisor supervision.supervisor
systemd supervision.systemd
states supervision.states
# status -> supervision.status: moved, then split (the client is daemon.status again)
"

path_of() { echo "daemon/${1//.//}"; }

if [ "${1:-}" != "--rewrite" ]; then
    for pkg in domain app roles supervision; do
        if [ ! -e "daemon/$pkg/__init__.py" ]; then
            mkdir -p "daemon/$pkg"
            echo '"""See docs/architecture.md for what this layer holds."""' > "daemon/$pkg/__init__.py"
            git add "daemon/$pkg/__init__.py"
        fi
    done
    while read -r old new; do
        [ -z "$old" ] || [ "${old:0:1}" = "#" ] && continue
        src=$(path_of "$old"); dst=$(path_of "$new")
        if [ -d "$src" ] && [ ! -e "$dst" ]; then git mv "$src" "$dst"
        elif [ -f "$src.py" ] && [ ! -e "$dst.py" ]; then git mv "$src.py" "$dst.py"
        fi
    done <<< "$MOVES"
fi

files=$(git ls-files '*.py' '*.md' '*.toml' '*.cfg' '*.sh' '*.service' '*.yml' '*.yaml' .ci/run \
        | grep -v '^tools/restructure_moves.sh$' | grep -v '^tests/unit/test_architecture.py$' | grep -v '^\.library' || true)
files="$files $(git ls-files --others --exclude-standard '*.py' | grep -v '^\.venv' || true)"
sedargs=()
while read -r old new; do
    [ -z "$old" ] || [ "${old:0:1}" = "#" ] && continue
    o=${old//./\\.}; parent=${new%.*}; leaf=${new##*.}
    # dotted: from daemon.X / import daemon.X / "daemon.X / -m daemon.X / `daemon.X
    sedargs+=(-e "s/\\(from \\|import \\|[\"'\`]\\|-m \\)daemon\\.$o\\b/\\1daemon.$new/g")
    # from daemon import X
    sedargs+=(-e "s/from daemon import $o\\b/from daemon.$parent import $leaf/g")
    # file paths in prose: daemon/X.py, daemon/X/
    po=${old//./\\/}; pn=${new//./\\/}
    sedargs+=(-e "s/\\bdaemon\\/$po\\.py\\b/daemon\\/$pn.py/g" -e "s/\\bdaemon\\/$po\\//daemon\\/$pn\\//g")
done <<< "$MOVES"
# shellcheck disable=SC2086
sed -i "${sedargs[@]}" $files
.venv/bin/ruff check --fix -q . || true
.venv/bin/ruff format -q .
echo "restructure: moves and rewrites done"
