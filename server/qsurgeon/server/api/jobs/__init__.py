"""Job management behind the REST API, apart from the HTTP layer so it can be driven directly.

``store``     job records and events in Redis (they outlive the orchestrator)
``submit``    a request (JSON or multipart) becomes a stored job, or nothing at all
``archives``  uploaded model folders unpacked without trusting them
``runner``    what a job runs: ``run_prune`` (or one raw block) through the Redis queue
``manager``   the threads that run jobs, resume them after a restart and cancel them
"""
