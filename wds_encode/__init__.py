"""wds-encode: pre-encode audio datasets into autoencoder latents, shard by shard.

A sample's path through the package, one module per stage:
sources (work units) -> distributed (which rank and worker claims a unit) -> reader (tar members
-> windows, via audio) -> batching (windows of one length per batch) -> encoder (latents, and the
precision check at start; models/ holds the networks, stable-audio-tools' and Stable Audio 3's SAME,
models/layout their channels-last CPU form;
pinned the page-locked buffers batches reach a GPU through) -> writers (folder layout + latent
shards) -> manifest (what is done). Back into training: loader reads either form as batches.
Around them: storage/ reads and writes local paths and s3:// alike behind one interface, one module per
backend (storage/local, storage/s3, and storage/stream for S3 reads that resume with a ranged GET); resources sizes workers and
threads to the CPUs and memory at hand, and heap keeps a CPU run's freed memory for reuse; plan checks
the inputs and decides what is left to do before the model loads, runner drives one rank's loop, and
preemption turns a stop signal (SIGTERM) into committing what is in flight; progress shows the job's progress; status reports an output's state;
inspect sums up its contents (counts, latent statistics, scale factor; inspect_plot draws them);
compat checks the torch release at start; cli is the command.
"""

__version__ = "0.1.0"
