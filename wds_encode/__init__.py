"""wds-encode: pre-encode audio datasets into autoencoder latents, shard by shard.

The folders show the parts, in layers (no module imports from a layer above its own):
- pipeline/: the stages one sample walks through, in order: sources (work units) -> reader (tar
  members -> windows, in a decode worker: decoders/ turns bytes into source frames, one module per
  backend, libsndfile and PyAV; audio cuts and resamples them into windows; filters skips files by
  length or level) -> batching (windows of one length per batch) -> resampling (in the main process,
  `--resample-on device`: windows still at their source rate resampled on the device) -> encoder
  (latents, and the precision check at start; pinned holds the page-locked buffers batches reach a GPU
  through) -> writers (folder layout + latent shards) -> manifest (what is committed: one record per
  unit, compacted into index objects so that readers need a handful of requests at any scale).
- models/: the networks, stable-audio-tools' families and Stable Audio 3's SAME (models/layout: their
  channels-last CPU form); storage/: local paths and s3:// alike behind one interface, one module per
  backend (storage/local, storage/s3, storage/stream for S3 reads resumed with a ranged GET).
- job/: what runs the job around the pipeline: distributed (the launch; the job's store: claims,
  heartbeats, stops, stats), resources (workers and threads for the CPUs and memory at hand), heap (a
  CPU run's freed memory kept for reuse), progress (one display per job), preemption (a stop signal
  commits what is in flight), parts (array jobs: part K of N, its share of the units, its rank ids,
  the lease that keeps two processes of one part from running together).
- plan checks the inputs and decides what is left to do before the model loads; runner drives one
  rank's loop (loader -> batcher -> encoder -> writer thread -> commit); cli is the command; config its
  options; compat checks the torch release at start; demo and synth make the bundled example.
- tools/: what looks at an output afterwards: status (its state), inspect (counts, latent statistics,
  scale factor; inspect_plot draws them), verify (decode back and compare).
- loader: back into training, either output form as batches.
"""

__version__ = "0.1.0"
