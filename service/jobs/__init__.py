"""Background work: the runner that executes durable jobs from the job queue."""

from service.jobs.runner import JobRunner, LeasedJobQueue, new_worker_id

__all__ = ["JobRunner", "LeasedJobQueue", "new_worker_id"]
