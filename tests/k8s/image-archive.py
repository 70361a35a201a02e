#!/usr/bin/env python3
"""Writes a docker-archive image (what `ctr images import` and `docker load` read) without a
registry or a container engine: layers are plain tar files, applied in order.

    image-archive.py OUT.tar NAME:TAG CONFIG.json LAYER.tar [LAYER.tar ...]

CONFIG.json holds the image's `config` (Entrypoint, Cmd, User, Env, WorkingDir)."""
import hashlib
import io
import json
import sys
import tarfile


def main():
    out, name, config_file, layers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    with open(config_file) as f:
        runtime = json.load(f)
    diff_ids = []
    for layer in layers:
        digest = hashlib.sha256()
        with open(layer, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        diff_ids.append("sha256:" + digest.hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": runtime,
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with tarfile.open(out, "w") as archive:
        names = []
        for i, layer in enumerate(layers):
            names.append(f"layer{i}.tar")
            archive.add(layer, arcname=names[-1])
        for path, data in [
            (config_name, config),
            ("manifest.json", json.dumps([{"Config": config_name, "RepoTags": [name],
                                           "Layers": names}]).encode()),
        ]:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
