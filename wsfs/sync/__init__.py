"""The sync layer: the one place that orders durability, above `blocks/` and `meta/`.

flusher: the Flusher (dirty blocks up first, then the checkpoint that names them);
repack: the Repacker (the survivors of mostly dead packs move into new packs).
"""
