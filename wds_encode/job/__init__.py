"""What runs the job around the pipeline: distributed (the launch, the job's store: claims, heartbeats,
stops), resources (CPUs and memory per rank), progress (one display per job), heap (a CPU run's freed
memory kept), preemption (a stop signal commits what is in flight)."""
