"""The stages one sample walks through, in order: sources (work units) -> reader (tar members -> windows,
via audio) -> batching -> encoder (latents; pinned buffers on a GPU) -> writers (both output forms) ->
manifest (what is committed)."""
