# Sourced by the benchmark scripts: `need TOOL PACKAGE...` stops with a line naming what is
# missing and the Debian package that has it, instead of failing half way (or silently).
need() {
  local tool=$1 package=$2
  command -v "$tool" >/dev/null 2>&1 && return 0
  echo "$(basename "$0"): needs $tool: apt-get install $package" >&2
  exit 2
}
