#!/usr/bin/env bash
# Makes the example's input data in the folder given (default: this one): four small GeoTIFF
# tiles in WGS 84 (raw/tile_*.tif) and a GeoJSON file of three points (vector/sites.geojson), and
# the folders the steps write to. Needs gdal_create (Debian's gdal-bin).
set -euo pipefail
dir=${1:-$(dirname "$0")}
mkdir -p "$dir/raw" "$dir/vector" "$dir/work" "$dir/cog" "$dir/out"
i=0
for lon in 10 11; do
  for lat in 47 46; do
    i=$((i + 1))
    gdal_create -q -of GTiff -outsize 64 64 -bands 1 -ot Byte -burn $((i * 40)) \
      -a_srs EPSG:4326 -a_ullr "$lon" "$lat" $((lon + 1)) $((lat - 1)) "$dir/raw/tile_$i.tif"
  done
done
cat > "$dir/vector/sites.geojson" <<'JSON'
{"type": "FeatureCollection", "features": [
 {"type": "Feature", "properties": {"name": "a"}, "geometry": {"type": "Point", "coordinates": [10.5, 46.5]}},
 {"type": "Feature", "properties": {"name": "b"}, "geometry": {"type": "Point", "coordinates": [11.2, 45.8]}},
 {"type": "Feature", "properties": {"name": "c"}, "geometry": {"type": "Point", "coordinates": [10.9, 46.1]}}
]}
JSON
