"""What runs the job around the pipeline: distributed (the launch, the job's store: claims, heartbeats,
stops), resources (CPUs and memory per rank), progress (one display per job), heap (a CPU run's freed
memory kept), preemption (a stop signal commits what is in flight), parts (array jobs: part K of N,
its units, its rank ids, its lease)."""
