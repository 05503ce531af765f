# Sourced by the recipe scripts (squad_open.sh, wiki_vital.sh): `stage NAME COMMAND...` runs the command and
# prints its wall time and the script's running total to stderr.
stage() {
  local name=$1 t0=$SECONDS
  shift
  echo "== $name ==" >&2
  "$@"
  echo "== $name: $((SECONDS - t0)) s (total $SECONDS s) ==" >&2
}
