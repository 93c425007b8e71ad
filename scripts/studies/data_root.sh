# Sourced by the study scripts: sets data_root from --data-root DIR (default: ../shared/data beside the
# repository) and stops with exit code 2 on any other argument or a missing folder.
repo=$(cd "$(dirname "$0")/../.." && pwd)
data_root=$repo/../shared/data
while [ $# -gt 0 ]; do
  case $1 in
    --data-root) data_root=${2:?--data-root needs a folder}; shift 2 ;;
    --data-root=*) data_root=${1#--data-root=}; shift ;;
    *) echo "$(basename "$0"): unknown argument $1 (only --data-root DIR)" >&2; exit 2 ;;
  esac
done
[ -d "$data_root" ] || { echo "$(basename "$0"): data root $data_root is not a folder (pass --data-root DIR)" >&2; exit 2; }
